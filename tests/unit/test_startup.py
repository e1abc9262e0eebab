"""Start-up: a command imports only what it uses (checked in ``sys.modules`` of a fresh interpreter, not in time).

``import ml_dtypes`` alone took 0.74 s and numpy 0.15 s, and every command paid for them (and for the
whole library) before printing a line. Now: the package, the CLI and every ``--help`` import none of
numpy, ml_dtypes, torch, transformers or the Hub client; ``inspect`` of a checkpoint whose files are
all local imports none of them either; a conversion imports numpy only when it casts, ml_dtypes never
(bfloat16 is cast on the bits), and torch not at all on the numpy path.

Within the library, the format registry names each format's module by string and imports it when
detection asks it, and the LoRA and quantization planners load only for a LoRA fine-tune or ``--quantize``:
a ZeRO conversion imports no other format's reader, and ``--help`` plans nothing.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vllm_consolidate.cli import COMMANDS, main

HEAVY = ("numpy", "ml_dtypes", "torch", "transformers", "huggingface_hub.hf_api")

# Runs the CLI's ``main`` (what the console script runs; ``-m vllm_consolidate`` adds only __main__'s
# import of the CLI) or imports a module, then prints the modules loaded.
_PROBE = """
import contextlib, io, json, sys
what, args = sys.argv[1], sys.argv[2:]
code = None
if what == "import":
    __import__(args[0])
else:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        from vllm_consolidate.cli import main
        try:
            code = main(args)
        except SystemExit as exc:
            code = exc.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def _modules(*argv: str, env: dict[str, str] | None = None) -> tuple[Any, set[str]]:
    """``(exit code, modules loaded)`` of a fresh interpreter: ``("import", MODULE)`` or ``("cli", *ARGS)``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.splitlines()[-1])
    return found["code"], set(found["modules"])


def _heavy(modules: set[str]) -> list[str]:
    return [m for m in HEAVY if m in modules]


@pytest.mark.parametrize("module", ["vllm_consolidate", "vllm_consolidate.cli", "vllm_consolidate.casts"])
def test_import_is_light(module):
    _, modules = _modules("import", module)
    assert _heavy(modules) == []
    if module != "vllm_consolidate.casts":  # the package and the CLI bind the library on first use
        assert not {"vllm_consolidate.convert", "vllm_consolidate.read", "vllm_consolidate.batch"} & modules


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_is_light(command):
    code, modules = _modules("cli", *([command] if command else []), "--help")
    assert code == 0
    assert _heavy(modules) == []
    others = {f"vllm_consolidate.cli.{name}" for name in COMMANDS if name != command}
    assert not others & modules, "a command's --help imports only its own module"
    if command != "batch":  # the batch command's module imports the batch package (runner, executors): not yet
        # no planner, writer or format reader for a help text (``convert --help`` imported the whole library)
        assert not {"vllm_consolidate.conversion", "vllm_consolidate.plan", "vllm_consolidate.write",
                    "vllm_consolidate.read.deepspeed", "vllm_consolidate.read.hf"} & modules


#: What a local ZeRO conversion never uses: the other formats' claims and readers (and the modules only they
#: import), the LoRA planner (no adapter) and the quantization planner (no ``--quantize``).
NOT_ZERO = ("read.megatron", "read.fsdp_locate", "read.dcp", "read.verl", "read.peft", "read.hf", "read.hf_layout",
            "formats.dcp", "formats.dtensor", "formats.megatron_common", "plan.lora", "plan.quantize")


def test_a_zero3_conversion_imports_no_other_format(case_dir, tmp_path):
    """ZeRO claims the folder first, so detection asks no other format and no other reader is imported."""
    names = {f"vllm_consolidate.{m}" for m in NOT_ZERO}
    assert all(importlib.util.find_spec(n) is not None for n in names)  # real modules: else this could not fail
    code, modules = _modules("cli", "convert", "--input", str(case_dir("qwen2_z3_w2_bf16_tied") / "ckpt"),
                             "--output", str(tmp_path / "out"), "--dtype", "bfloat16", "--no-validate-vllm", "--json")
    assert code == 0 and (tmp_path / "out" / "config.json").is_file()
    assert "vllm_consolidate.read.deepspeed" in modules  # the probe sees the reader it used
    assert sorted(names & modules) == []
    assert "socket" not in modules  # the object-store staging's host lookup


def _tiny_hf_folder(folder: Path) -> dict[str, list[float]]:
    """A tiny HF model folder with every asset local (no Hub id to resolve); returns its tensors' values."""
    folder.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 16, "hidden_size": 8,
              "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
              "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 0}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "WordLevel",
                                                                                   "vocab": {"a": 0}}}))
    # Values with low halves that round down, up and to even when cut to bfloat16.
    values = {"lm_head.weight": [1.0 + k * 2**-9 + k * 2**-20 for k in range(128)],
              "model.embed_tokens.weight": [-0.1 * k + 3e-38 for k in range(128)]}
    header, data = {}, b""
    for name, vals in values.items():
        payload = struct.pack(f"<{len(vals)}f", *vals)
        header[name] = {"dtype": "F32", "shape": [16, 8], "data_offsets": [len(data), len(data) + len(payload)]}
        data += payload
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return values


def _bfloat16_bits(value: float) -> int:
    """Round to nearest even, from the float32 bits (finite values only): what torch's ``.to(bfloat16)`` does."""
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    return (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16


def _tensor_bytes(path: Path) -> dict[str, bytes]:
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    header.pop("__metadata__", None)
    return {name: raw[8 + size + e["data_offsets"][0]:8 + size + e["data_offsets"][1]] for name, e in header.items()}


def test_inspect_of_a_local_folder_imports_no_tensor_library_nor_hub(tmp_path):
    _tiny_hf_folder(tmp_path / "model")
    code, modules = _modules("cli", "inspect", str(tmp_path / "model"))
    assert code == 0
    assert _heavy(modules) == [] and "huggingface_hub" not in modules  # no Hub id to resolve
    # the batch runner and its executors (and multiprocessing) are not inspect's
    assert "vllm_consolidate.batch.run" not in modules and "vllm_consolidate.batch.executor" not in modules
    assert "ctypes.util" not in modules  # the writer's find_library("c") runs ldconfig in a subprocess


def test_inspect_of_a_zero3_checkpoint_imports_no_tensor_library(case_dir):
    code, modules = _modules("cli", "inspect", str(case_dir("qwen2_z3_w2_bf16_tied") / "ckpt"))
    assert code == 0
    assert _heavy(modules) == []


def test_convert_loads_the_cast_kernel_only_to_cast(tmp_path):
    values = _tiny_hf_folder(tmp_path / "model")
    common = ["--input", str(tmp_path / "model"), "--no-validate-vllm", "--json"]

    code, modules = _modules("cli", "convert", *common, "--output", str(tmp_path / "fp32"), "--force")
    assert code == 0
    assert _heavy(modules) == []  # a plain copy: the kernel copies the bytes
    want = {name: struct.pack(f"<{len(v)}f", *v) for name, v in values.items()}
    assert _tensor_bytes(tmp_path / "fp32" / "model.safetensors") == want

    code, modules = _modules("cli", "convert", *common, "--output", str(tmp_path / "bf16"), "--dtype", "bfloat16")
    assert code == 0
    # The C kernel casts (built by the install: casts.py); numpy would be 0.1 s more, ml_dtypes 0.7 s.
    assert "vllm_consolidate._castkernel" in modules
    assert "numpy" not in modules and "torch" not in modules and "transformers" not in modules
    assert "ml_dtypes" not in modules
    want = {name: struct.pack(f"<{len(v)}H", *map(_bfloat16_bits, v)) for name, v in values.items()}
    assert _tensor_bytes(tmp_path / "bf16" / "model.safetensors") == want


def test_the_progress_line_costs_no_import(tmp_path):
    _tiny_hf_folder(tmp_path / "model")
    code, modules = _modules("cli", "convert", "--input", str(tmp_path / "model"), "--output", str(tmp_path / "out"),
                             "--no-validate-vllm", "--force")  # not --json: the progress line is on
    assert code == 0
    assert "tqdm" not in modules  # 0.17 s of imports (importlib.metadata, email) for a progress bar


def _cached_base(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny model laid out in a private HF cache as ``acme/tiny`` (as huggingface_hub lays a download out), and a
    checkpoint of it without a tokenizer; returns ``(cache, checkpoint)``."""
    from tests.corpus.lora_build import write_hf_cache

    _tiny_hf_folder(tmp_path / "base")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (ckpt / name).write_bytes((tmp_path / "base" / name).read_bytes())
    write_hf_cache(tmp_path / "base", tmp_path / "hub", "acme/tiny")
    return tmp_path / "hub", ckpt


def test_a_base_model_in_the_hf_cache_is_found_without_the_hub_client(tmp_path):
    """The tokenizer the checkpoint lacks comes from the cached base model; no huggingface_hub import (0.2-0.3 s)."""
    cache, ckpt = _cached_base(tmp_path)
    for offline in ("1", "0"):  # online too: a cached model needs no request
        out = tmp_path / f"out{offline}"
        code, modules = _modules("cli", "convert", "--input", str(ckpt), "--output", str(out), "--no-validate-vllm",
                                 "--force", "--base-model-name", "acme/tiny", env={"HF_HUB_CACHE": str(cache),
                                                                        "HF_HUB_OFFLINE": offline})
        assert code == 0
        assert "huggingface_hub" not in modules
        assert (out / "tokenizer.json").read_bytes() == (tmp_path / "base" / "tokenizer.json").read_bytes()


def test_the_cache_lookup_agrees_with_huggingface_hub(tmp_path, monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants

    from vllm_consolidate.read.assets import resolve_base_model
    from vllm_consolidate.read.hub_cache import cached_model

    cache, _ = _cached_base(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    hub = huggingface_hub.snapshot_download("acme/tiny", local_files_only=True)
    assert resolve_base_model("acme/tiny") == (Path(hub), None)
    assert cached_model("acme/tiny", ("config.json",)) == (True, Path(hub))
    assert cached_model("acme/other", ()) == (False, None)
    for odd in ("../hub", "acme--tiny", "acme/tiny/x", "/etc"):  # not a Hub id: huggingface_hub decides
        assert cached_model(odd, ()) == (None, None)
    (Path(hub) / "tokenizer.json").unlink()  # a snapshot that looks partial is huggingface_hub's to judge
    assert cached_model("acme/tiny", ("tokenizer.json",)) == (None, None)


def test_a_base_model_not_in_the_cache_offline_costs_no_hub_import(tmp_path):
    _, ckpt = _cached_base(tmp_path)
    out = tmp_path / "out"
    code, modules = _modules("cli", "convert", "--input", str(ckpt), "--output", str(out), "--no-validate-vllm",
                             "--force", env={"HF_HUB_CACHE": str(tmp_path / "empty")})
    assert code == 0
    assert "huggingface_hub" not in modules
    assert not (out / "tokenizer.json").exists()


def test_writeback_is_looked_up_on_the_first_write(tmp_path):
    from vllm_consolidate.write import safetensors as writer

    path = tmp_path / "f"
    path.write_bytes(b"x" * 4096)
    fd = os.open(path, os.O_WRONLY)
    try:
        writer.start_writeback(fd, 0, 4096)
    finally:
        os.close(fd)
    assert writer._sync_file_range is not writer._NOT_LOADED
    if sys.platform.startswith("linux"):
        assert callable(writer._sync_file_range)


def test_package_convert_is_the_function_even_after_its_module_is_imported():
    probe = ("import types, vllm_consolidate.convert as m; from vllm_consolidate import convert; "
             "import vllm_consolidate as v; assert not isinstance(convert, types.ModuleType), convert; "
             "assert convert is v.convert is __import__('sys').modules['vllm_consolidate.convert'].convert; "
             "assert m is convert")  # ``import a.b as m`` reads the attribute, as before this change
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_casts_know_their_dtypes_without_numpy():
    from vllm_consolidate import casts, dtypes

    assert casts.numpy_castable(dtypes.float32, dtypes.bfloat16)
    assert not casts.numpy_castable(dtypes.float32, dtypes.float8_e4m3fn)
    assert set(casts.NAN_ABOVE) == casts.NUMPY_CASTABLE


class _Recorder:
    """A stand-in for ``add_subparsers()``: records the help line and builds the parser eagerly, as before."""

    def add_parser(self, name: str, help: str | None = None, **settings: Any) -> argparse.ArgumentParser:  # noqa: A002
        self.help = help
        self.parser = argparse.ArgumentParser(prog=f"vllm-consolidate {name}", **settings)
        return self.parser


@pytest.mark.parametrize("name", [n for n in COMMANDS if n != "convert"])
def test_lazy_subcommand_help_is_the_eager_one(name, capsys):
    module = importlib.import_module(COMMANDS[name][0])
    eager = _Recorder()
    module.add_parser(eager)
    assert eager.help == COMMANDS[name][1], "the command list shows the module's own help line"
    with pytest.raises(SystemExit):
        main([name, "--help"])
    assert capsys.readouterr().out == eager.parser.format_help()


class _Stream:
    def __init__(self, tty: bool):
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("tty", [True, False])
def test_progress_redraws_on_a_terminal_and_logs_lines_elsewhere(monkeypatch, tty):
    from vllm_consolidate.cli import common

    clock = iter([100.0, 100.05, 100.5, 111.0, 112.0])  # one call each
    monkeypatch.setattr(common.time, "monotonic", lambda: next(clock))
    stream = _Stream(tty)
    progress = common.Progress(enabled=True, stream=stream)
    total = 2 * 10**9
    for done in (0, 10**8, 5 * 10**8, 10**9, total):
        progress(done, total)
    if tty:  # every redraw (>= 0.2 s apart) overwrites the line; one newline at the end
        assert stream.text.count("\r") == 4 and stream.text.endswith("writing: 100% 2.00/2.00 GB, 167 MB/s\x1b[K\n")
        assert "writing:  25% 0.50/2.00 GB, 1.00 GB/s, 2 s left" in stream.text
    else:  # a line every 10 s, and the last
        assert stream.text.splitlines() == ["writing:  50% 1.00/2.00 GB, 91 MB/s, 11 s left",
                                            "writing: 100% 2.00/2.00 GB, 167 MB/s"]
