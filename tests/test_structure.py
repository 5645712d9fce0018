"""The shape of the folder: which file may import which (an exact table: any other import fails), the rules the
table keeps (library files import only library files listed before them; a stage script imports library and data
files and at most one hub; nothing imports a stage; no chain longer than 5 files; at most 89 imports), the
README's file list against the table, and the files meant to be copied into another project, copied alone."""
import ast
import functools
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

# kind of each file, in the order library files may import each other (a library imports only those above it)
KINDS = {
    "cli": "library", "model": "library", "lora": "library", "quantize": "library", "records": "library",
    "tools": "library", "tokenizer": "library", "runtime": "library", "evaluate": "library", "offline_data": "library",
    "dataset": "data", "dataset_sft": "data",  # build their data when run, and are its readers when imported
    "train": "hub", "inference": "hub",  # a stage's one hub: the training loop, the loader for generation
    "download_mini_data": "stage", "train_tokenizer": "stage", "train_sft": "stage", "distill": "stage",
    "train_dpo": "stage", "train_grpo": "stage", "inference_sft": "stage", "serve": "stage", "convert_hf": "stage",
    "bench": "tool",  # measures the library files and hubs; nothing imports it
}
# every import between the project's files
IMPORTS = {
    "cli": [],
    "model": [],
    "lora": ["model"],
    "quantize": ["model"],
    "records": ["cli"],
    "tools": [],
    "tokenizer": ["cli"],
    "runtime": ["cli", "model"],
    "evaluate": ["cli", "lora", "model", "quantize", "records", "runtime", "tokenizer", "tools"],
    "offline_data": ["cli", "records", "tools"],
    "dataset": ["cli", "records", "tokenizer"],
    "dataset_sft": ["cli", "records", "tokenizer"],
    "train": ["cli", "dataset", "evaluate", "lora", "model", "runtime"],
    "inference": ["cli", "evaluate", "model", "quantize", "runtime", "tokenizer"],
    "download_mini_data": ["cli", "offline_data", "records"],
    "train_tokenizer": ["cli", "records", "tokenizer"],
    "train_sft": ["cli", "dataset_sft", "runtime", "train"],
    "distill": ["cli", "dataset_sft", "evaluate", "runtime", "train"],
    "train_dpo": ["cli", "dataset_sft", "evaluate", "lora", "records", "runtime", "train"],
    "train_grpo": ["cli", "dataset_sft", "evaluate", "lora", "runtime", "tokenizer", "train"],
    "inference_sft": ["cli", "inference", "tokenizer", "tools"],
    "serve": ["cli", "inference", "model", "records", "tokenizer", "tools"],
    "convert_hf": ["cli", "dataset", "lora", "model", "quantize", "records", "tokenizer"],
    "bench": ["cli", "dataset_sft", "lora", "model", "offline_data", "quantize", "runtime", "tokenizer"],
}
LIBRARY_ORDER = [name for name, kind in KINDS.items() if kind == "library"]


def project_imports(name: str) -> list:
    """The project files a file imports, anywhere in it (inside functions too)."""
    tree = ast.parse((ROOT / f"{name}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return sorted(found & set(KINDS))


def test_every_file_has_a_kind_and_imports_exactly_its_table_row():
    files = sorted(path.stem for path in ROOT.glob("*.py"))
    assert files == sorted(KINDS) == sorted(IMPORTS), "a file was added or removed: give it a kind and a row"
    wrong = {name: project_imports(name) for name in files if project_imports(name) != IMPORTS[name]}
    assert not wrong, f"imports that differ from the table: {wrong}"


@pytest.mark.parametrize("name", list(IMPORTS))
def test_the_table_keeps_the_rules(name):
    kind, imported = KINDS[name], IMPORTS[name]
    kinds = [KINDS[other] for other in imported]
    assert "stage" not in kinds and "tool" not in kinds, f"{name} imports a stage script"
    if kind == "library":
        assert all(LIBRARY_ORDER.index(other) < LIBRARY_ORDER.index(name) for other in imported), \
            f"{name} imports a library file listed after it, or a file that is not a library"
        if name == "model":
            assert imported == []
    elif kind == "data":
        assert set(kinds) <= {"library"}
    elif kind == "hub":
        assert set(kinds) <= {"library", "data"}
    elif kind == "stage":
        assert set(kinds) <= {"library", "data", "hub"} and kinds.count("hub") <= 1, f"{name}: at most one hub"


def test_few_imports_and_short_chains():
    @functools.lru_cache(None)
    def chain(name):  # the longest import chain starting at this file, in files
        return 1 + max((chain(other) for other in IMPORTS[name]), default=0)
    # ARCHITECTURE.md aims at ~70; train_grpo.py's seven (it samples, so it needs the tokenizer and LoRA's switch);
    # serve.py's model (its batch samples each row with model.sample); bench.py's tokenizer (its serving rows)
    # 84: the report card made evaluate.py a script (cli, runtime) and the home of the loader of any checkpoint
    # (model, lora, quantize), which inference.py takes from it
    # 89: tool calling's tools.py (the calculator, a tool's schema, reading and running a call: the generator, the
    # report, the chat and the server) and serve.py reading OpenAI's tool calls as the training data is read (records)
    assert sum(map(len, IMPORTS.values())) <= 89
    assert max(map(chain, IMPORTS)) <= 5


def test_the_readme_lists_every_file_with_its_kind_and_imports():
    rows = {}
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        match = re.match(r"\| `(\w+)\.py` \| (\w+) \| ([^|]*) \|", line)
        if match:
            name, kind, imported = match.groups()
            rows[name] = (kind, sorted(re.findall(r"`(\w+)`", imported)))
    assert rows == {name: (KINDS[name], sorted(IMPORTS[name])) for name in KINDS}


COPIED_ALONE = {  # file -> what else it needs (project files) and a use of it in another project
    "model.py": ([], "import model; m = model.Transformer(model.ModelConfig(dim=32, n_layers=1, n_heads=4, "
                     "n_kv_heads=2, vocab_size=64)); print(len(m.generate([1, 2], max_new_tokens=3, temperature=0)))"),
    "lora.py": (["model.py"], "import lora, model, torch; m = model.Transformer(model.ModelConfig(dim=32, n_layers=1, "
                "n_heads=4, n_kv_heads=2, vocab_size=64)); x = torch.tensor([[1, 2, 3]]); before = m(x)[0]; "
                "lora.add_lora(m, rank=2, alpha=4.0); print(torch.equal(lora.merge_lora(m)(x)[0], before))"),
    "quantize.py": (["model.py"], "import quantize, model, torch; m = model.Transformer(model.ModelConfig(dim=32, "
                    "n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64)); q = quantize.quantize_model(m); "
                    "print(quantize.is_quantized(q) and len(q.generate([1, 2], max_new_tokens=3, temperature=0)) == 3)"),
}


OPTIONAL = {"lora.py": {"torchao"}}  # imported inside a function, only when used (QLoRA's NF4 base)


def imported_names(nodes) -> set:
    """The top-level packages that the import statements among `nodes` name."""
    return {alias.name.split(".")[0] for node in nodes if isinstance(node, ast.Import) for alias in node.names} | \
        {node.module.split(".")[0] for node in nodes if isinstance(node, ast.ImportFrom)}


@pytest.mark.parametrize("name", list(COPIED_ALONE))
def test_a_file_meant_to_be_copied_works_alone_in_an_empty_folder(name, tmp_path):
    """model.py alone, lora.py and quantize.py each with model.py: torch and the standard library besides (and, only
    inside the functions that need it, an optional library)."""
    needs, code = COPIED_ALONE[name]
    assert sorted(f"{other}.py" for other in IMPORTS[name.removesuffix(".py")]) == needs
    tree = ast.parse((ROOT / name).read_text(encoding="utf-8"))
    allowed = {"torch", *(n.removesuffix(".py") for n in needs)} | set(sys.stdlib_module_names)
    assert imported_names(tree.body) <= allowed, imported_names(tree.body)
    assert imported_names(ast.walk(tree)) <= allowed | OPTIONAL.get(name, set()), imported_names(ast.walk(tree))
    for file in [name, *needs]:
        shutil.copy(ROOT / file, tmp_path / file)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("3" if name == "model.py" else "True"), r.stdout
