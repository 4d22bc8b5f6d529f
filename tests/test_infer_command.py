"""infer.py's logic through its package API (`rtpurbo_jax.infer.command`), without absl: the
options apply to the config, bad options are one CliError each, and `Options` is infer.py's
flags (names and defaults)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from rtpurbo_jax.infer import command
from rtpurbo_jax.infer.command import CliError, Options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_config():
  spec = importlib.util.spec_from_file_location("tiny_config",
                                                os.path.join(ROOT, "configs", "tiny.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def test_options_are_infer_py_flags():
  # In a subprocess: loading infer.py defines its flags in absl's process-wide registry.
  code = ("import dataclasses, importlib.util, json, sys\n"
          "spec = importlib.util.spec_from_file_location('infer_cli', 'infer.py')\n"
          "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
          "names = [f.name for f in dataclasses.fields(m.command.Options)]\n"
          "print(json.dumps({n: m.FLAGS[n].default for n in names if n in m.FLAGS}))\n")
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                     timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-2000:]
  defaults = json.loads(r.stdout.splitlines()[-1])
  assert defaults == {k: v for k, v in vars(Options()).items()}


def test_options_override_the_config():
  cfg, ctx = command.resolve_config(
      _tiny_config(), Options(ctx="2K", model="some/folder", mode="dense", max_new_tokens=3))
  assert ctx == 2048 and cfg.infer.ctx == "2K" and cfg.model_path == "some/folder"
  assert cfg.sparse.mode == "dense" and cfg.infer.max_new_tokens == 3

  cfg = _tiny_config()
  cfg.infer.model = "smollm2-135m-rtpurbo"
  assert command.resolve_config(cfg, Options())[0].model_path == "smollm2-135m-rtpurbo"
  cfg = _tiny_config()
  cfg.infer.model = "smollm2-135m-rtpurbo"
  # Random weights come from config.model; the inference model is not loaded.
  assert command.resolve_config(cfg, Options(random_weights=True))[0].model_path == ""


@pytest.mark.parametrize("opts,message", [
    (Options(passkey_depth=1.5), "--passkey_depth=1.5 must be in [0, 1]"),
    (Options(passkey_depth=-0.1), "--passkey_depth=-0.1 must be in [0, 1]"),
    (Options(prompt=""), "--prompt is empty: give a question"),
    (Options(prompt=" \n"), "--prompt is empty: give a question"),
    (Options(prompt="hi", prompt_file="p.txt"), "give either --prompt or --prompt_file"),
    (Options(max_new_tokens=0), "max_new_tokens=0 must be >= 1"),
    (Options(ctx="0"), "--ctx=0 must be at least 1 token"),
])
def test_bad_options_are_one_cli_error(opts, message):
  with pytest.raises(CliError) as e:
    command.resolve_config(_tiny_config(), opts)
  assert str(e.value).startswith(message)


class _Tok:
  """Words -> ids; `chat_template` set: apply_chat_template marks the text."""

  chat_template = "x"

  def __call__(self, text, add_special_tokens=True):
    return {"input_ids": [len(w) for w in text.split()] + ([0] if add_special_tokens else [])}

  def apply_chat_template(self, messages, tokenize, add_generation_prompt):
    return "<user> " + messages[0]["content"] + " <assistant>"


def test_prompt_options(tmp_path):
  tok = _Tok()
  assert command.prompt_ids(tok, Options(prompt="a bb"), 64, 4, 0) == ([6, 1, 2, 11], None)
  assert command.prompt_ids(tok, Options(prompt="a bb", chat=False), 64, 4, 0) == ([1, 2, 0],
                                                                                   None)
  default = command.prompt_ids(tok, Options(passkey=False, chat=False), 64, 4, 0)[0]
  assert default == tok(command.DEFAULT_PROMPT)["input_ids"]
  (tmp_path / "q.txt").write_text("ccc dddd")
  assert command.prompt_ids(tok, Options(prompt_file=str(tmp_path / "q.txt"), chat=False),
                            64, 4, 0) == ([3, 4, 0], None)
  (tmp_path / "empty.txt").write_text("\n")
  with pytest.raises(CliError, match="empty.txt is empty"):
    command.prompt_ids(tok, Options(prompt_file=str(tmp_path / "empty.txt")), 64, 4, 0)


def test_dry_run_reads_device_memory_from_the_options(capsys):
  command.main(_tiny_config(), Options(dry_run=True, device_memory="1G"))
  out = capsys.readouterr().out
  plan_lines = [l for l in out.splitlines() if " ctx=1K" in l]
  assert [l.split()[0] for l in plan_lines] == ["dense", "rtpurbo"]
  assert all("per device of 1.00 GB" in l for l in plan_lines)
  assert "KV cache at 1024 tokens: dense" in out
