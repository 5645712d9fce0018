"""
Tools a chat model may call, and the code that reads and runs its calls. Standard library only: the data generator,
the evaluation, the chat (inference_sft.py) and the server (which only reads calls) import it.

To add a tool, write a Python function whose parameters are annotated str, int, float or bool (those without a
default are required) and whose docstring's first paragraph says in a few words what it does (the model reads it in
every prompt: keep it short), return anything that prints well, raise ValueError with a short message for bad input,
and put the function in inference_sft.py's TOOLS table under its own name. tool_spec() makes the schema the prompt
lists; answer_call() reads a call's text (parse_call) and runs it (run_call), turning every mistake into an
"error: ..." result that the model reads instead of a crash. A model calls a tool well only once it has been
fine-tuned on chats that call it.

The calculator works out arithmetic on a whitelist of Python's syntax (read by ast, never eval'd), bounded so that
no expression can take long or grow huge: at most MAX_LENGTH characters, exponents of at most MAX_EXPONENT, every
number met (written, in between, the result) below MAX_MAGNITUDE.
"""
import ast
import inspect
import json
import operator

MAX_LENGTH = 200           # characters in an expression: a 10,000-character one is refused before it is parsed
MAX_EXPONENT = 64          # |b| in a ** b: 9 ** 9 ** 9 is refused before it is computed
MAX_MAGNITUDE = 10 ** 100  # every number met stays below it: 10 ** 64 * 10 ** 64 is refused
WHOLE_BELOW = 10 ** 10     # a whole float below this prints as an integer, exactly (10 significant digits)
SIGNS = str.maketrans({"×": "*", "÷": "/", "−": "-"})  # as people (and models) write them; "x" stays a name
ALLOWED = "numbers, + - * / // % ** and parentheses"
JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}  # a parameter's annotation -> schema
ACCEPTS = {str: (str,), int: (int,), float: (int, float), bool: (bool,)}  # the JSON values each annotation takes


def divide(a, b):
    """a / b, an integer when it comes out whole: 12 / 4 is 3, not 3.0."""
    if isinstance(a, int) and isinstance(b, int) and b and a % b == 0:
        return a // b
    return a / b


def power(a, b):
    """a ** b, the exponent checked first: a huge one would take long, however small the base."""
    if abs(b) > MAX_EXPONENT:
        raise ValueError(f"the exponent {b} is too large (at most {MAX_EXPONENT})")
    result = a ** b
    if isinstance(result, complex):  # (-8) ** 0.5
        raise ValueError("a negative number to a fractional power is not a real number")
    return result


BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: divide,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: power}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def evaluate(node):
    """The value of a parsed expression: numbers and the operators in BINARY and UNARY, anything else refused."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):  # not True, "3" or 2j
        value = node.value
    elif isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        value = UNARY[type(node.op)](evaluate(node.operand))
    elif isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        value = BINARY[type(node.op)](evaluate(node.left), evaluate(node.right))
    else:
        raise ValueError(f"{ast.unparse(node)!r} is not arithmetic: use {ALLOWED}")
    if not abs(value) < MAX_MAGNITUDE:  # also refuses inf and nan
        raise ValueError("a number is too large (the limit is 1e100)")
    return value


def number_text(value) -> str:
    """An integer as it is; a float to 10 significant digits (0.1 + 0.2 is 0.3), as an integer when it is whole
    (7 / 2 * 2 is 7, not 7.0)."""
    if isinstance(value, float) and float(f"{value:.10g}").is_integer() and abs(value) < WHOLE_BELOW:
        value = round(value)
    return str(value) if isinstance(value, int) else f"{value:.10g}"


def calculator(expression: str) -> str:
    """Work out an arithmetic expression.

    Numbers, + - * / // % ** and parentheses (× ÷ and − too); ValueError with a short message for anything else, a
    division by zero, or an expression past the bounds at the top of this file."""
    if len(expression) > MAX_LENGTH:
        raise ValueError(f"the expression is {len(expression)} characters long, more than {MAX_LENGTH}")
    try:
        tree = ast.parse(expression.translate(SIGNS).strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"{expression!r} is not an expression: use {ALLOWED}") from None
    try:
        return number_text(evaluate(tree.body))
    except ZeroDivisionError:
        raise ValueError("division by zero") from None
    except OverflowError:  # a float power past 1e308
        raise ValueError("a number is too large (the limit is 1e100)") from None


def tool_spec(fn) -> dict:
    """OpenAI's schema of a Python function as a tool: its name, the first paragraph of its docstring, and its
    parameters (annotated str, int, float or bool; those without a default required)."""
    properties, required = {}, []
    for name, p in inspect.signature(fn, eval_str=True).parameters.items():
        if p.annotation not in JSON_TYPES:
            raise TypeError(f"tool {fn.__name__}: annotate the parameter {name} as str, int, float or bool")
        properties[name] = {"type": JSON_TYPES[p.annotation]}
        if p.default is p.empty:
            required.append(name)
    description = " ".join((inspect.getdoc(fn) or "").split("\n\n")[0].split())
    return {"type": "function", "function": {"name": fn.__name__, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


def error_result(problem: str) -> str:
    """A call's result when it went wrong: the model reads what, and may call again."""
    return f"error: {problem}"


def argument_problem(fn, arguments: dict) -> str:
    """What is wrong with a call's arguments to fn, as the model reads it; "" when nothing is."""
    parameters = inspect.signature(fn, eval_str=True).parameters
    for name in arguments:
        if name not in parameters:
            return f"{fn.__name__} has no argument {name!r} (its arguments: {', '.join(parameters)})"
    for name, p in parameters.items():
        if name not in arguments and p.default is p.empty:
            return f"{fn.__name__} needs the argument {name!r}"
        if name in arguments and type(arguments[name]) not in ACCEPTS[p.annotation]:  # type(): True is no int
            return f"the argument {name!r} of {fn.__name__} must be of type {JSON_TYPES[p.annotation]}"
    return ""


def parse_call(text: str) -> dict:
    """{"name", "arguments"} of a call's text ({"name": ..., "arguments": {...}} in JSON, "arguments" optional);
    ValueError saying what is wrong with a malformed one."""
    try:
        call = json.loads(text)
    except ValueError:
        raise ValueError(f"the call is not valid JSON: {text.strip()[:100]!r}") from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) \
            or not isinstance(call.get("arguments", {}), dict):
        raise ValueError(f'the call is not {{"name": ..., "arguments": {{...}}}}: {text.strip()[:100]!r}')
    return {"name": call["name"], "arguments": call.get("arguments", {})}


def answer_call(text: str, tools: dict) -> tuple:
    """(the call, its result) for the text of a call (between <tool_call> and </tool_call>); (None, an error
    result) for a malformed one, which the model reads, and may call again."""
    try:
        call = parse_call(text)
    except ValueError as e:
        return None, error_result(str(e))
    return call, run_call(call, tools)


def run_call(call: dict, tools: dict) -> str:
    """The result of a call {"name", "arguments": {...}} run against tools (name -> function), as text for the
    model. Never raises for a bad call: an unknown tool, missing, unexpected or mistyped arguments, or a function that
    raises give an error_result instead."""
    fn = tools.get(call["name"])
    if fn is None:
        return error_result(f"no tool named {call['name']!r} (the tools: {', '.join(tools) or 'none'})")
    problem = argument_problem(fn, call["arguments"])
    if problem:
        return error_result(problem)
    try:
        return str(fn(**call["arguments"]))
    except Exception as e:  # whatever a tool raises is the model's to read, not a crash of the chat
        return error_result(str(e) or type(e).__name__)
