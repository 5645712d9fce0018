"""tools.py: the calculator's arithmetic, its refusals and bounds; a function's tool schema; run_call's errors."""
import re

import pytest

from tools import MAX_EXPONENT, MAX_LENGTH, calculator, run_call, tool_spec

TOOLS = {"calculator": calculator}


@pytest.mark.parametrize("expression, result", [
    ("2 + 3", "5"), ("12 / 4", "3"), ("7 / 2", "3.5"), ("7 // 2", "3"), ("7 % 3", "1"),  # integers stay exact
    ("2 + 3 * 4", "14"), ("(2 + 3) * 4", "20"), ("10 - 4 - 3", "3"), ("2 ** 3 ** 2", "512"),  # precedence
    ("-5 + 2", "-3"), ("-(3 - 5)", "2"), ("+4", "4"), ("2 * -3", "-6"),  # unary signs
    ("2 ** 10", "1024"), ("2 ** -2", "0.25"), ("2 ** 0.5", "1.414213562"), ("(-2) ** 3", "-8"),  # powers
    ("0.1 + 0.2", "0.3"), ("1 / 3", "0.3333333333"), ("7 / 2 * 2", "7"), ("2.5 * 4", "10"),  # floats
    ("1.5e10 * 1", "1.5e+10"), ("0.5 * -0.0", "0"),
    ("3 × 4", "12"), ("8 ÷ 2", "4"), ("9 − 4", "5"), ("  5 - 2  ", "3"), ("2 ** 64", str(2 ** 64)),
])
def test_the_calculator_works_out_arithmetic(expression, result):
    assert calculator(expression) == result


@pytest.mark.parametrize("expression, message", [
    ("1 / 0", "division by zero"), ("5 // 0", "division by zero"), ("5 % 0", "division by zero"),
    ("0 ** -1", "division by zero"),
    ("x + 1", "'x' is not arithmetic"), ("3 x 4", "not an expression"),  # "x" is not a times sign
    ("__import__('os').system('ls')", "is not arithmetic"), ("(1).real", "is not arithmetic"),
    ("abs(-3)", "is not arithmetic"), ("'2' + '2'", "is not arithmetic"), ("True + 1", "is not arithmetic"),
    ("2j", "is not arithmetic"), ("lambda: 1", "is not arithmetic"), ("[i for i in (1, 2)]", "is not arithmetic"),
    ("2 ^ 3", "is not arithmetic"), ("1 < 2", "is not arithmetic"), ("", "not an expression"),
    ("2 +", "not an expression"), ("(-8) ** 0.5", "not a real number"),
    ("9 ** 9 ** 9", f"the exponent 387420489 is too large (at most {MAX_EXPONENT})"),
    ("2 ** 65", "the exponent 65 is too large"), ("10 ** 64 * 10 ** 64", "a number is too large"),
    ("1e400", "a number is too large"), ("1e300 ** 2", "a number is too large"), ("9" * 101, "a number is too large"),
    ("1+" * 5000 + "1", f"the expression is 10001 characters long, more than {MAX_LENGTH}"),
])
def test_the_calculator_refuses_anything_else_with_a_short_message(expression, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        calculator(expression)


def test_a_tool_spec_is_openais_schema_from_the_signature_and_the_docstrings_first_paragraph():
    def weather(city: str, days: int = 1, metric: bool = True, hour: float = 12.0) -> str:
        """Tell the weather
        in a city.

        Longer notes for the reader of the code, not sent to the model."""
    assert tool_spec(weather) == {"type": "function", "function": {
        "name": "weather", "description": "Tell the weather in a city.", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                             "metric": {"type": "boolean"}, "hour": {"type": "number"}},
            "required": ["city"]}}}
    assert tool_spec(calculator)["function"] == {  # short: it is in every prompt
        "name": "calculator", "description": "Work out an arithmetic expression.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}

    def untyped(city):
        """No annotation."""
    with pytest.raises(TypeError, match="annotate the parameter city"):
        tool_spec(untyped)


def test_run_call_returns_the_result_or_an_error_and_never_raises():
    def crash(n: int) -> str:
        """Fails."""
        return {}[n]
    tools = {**TOOLS, "crash": crash}
    assert run_call({"name": "calculator", "arguments": {"expression": "5 - 2"}}, tools) == "3"
    errors = {
        "error: no tool named 'weather' (the tools: calculator, crash)": ("weather", {}),
        "error: calculator needs the argument 'expression'": ("calculator", {}),
        "error: calculator has no argument 'x' (its arguments: expression)": ("calculator", {"expression": "1",
                                                                                            "x": 2}),
        "error: the argument 'expression' of calculator must be of type string": ("calculator", {"expression": 3}),
        "error: the argument 'n' of crash must be of type integer": ("crash", {"n": True}),
        "error: division by zero": ("calculator", {"expression": "1 / 0"}),
        "error: 7": ("crash", {"n": 7}),  # whatever the function raises: KeyError(7)
    }
    for error, (name, arguments) in errors.items():
        assert run_call({"name": name, "arguments": arguments}, tools) == error
    assert run_call({"name": "calculator", "arguments": {}}, {}) == \
        "error: no tool named 'calculator' (the tools: none)"
