"""Generator of the NeMo 2 corpus case: a real ``weights/`` + ``context/`` save written by nemo_toolkit on CPU.

The case is written by NeMo's own code (``tests/corpus/nemo_save.py``, launched under the NeMo venv's
``torchrun``: ``scripts/setup_nemo_venv.sh``, ``make setup-nemo``) next to ground truth gathered from the live
model. This registry runs in the test venv.

Usage (from the repo root)::

    python -m tests.corpus.nemo_build               # build the case if missing, print a table
    python -m tests.corpus.nemo_build --rebuild     # rebuild it

Cache root: ``$VLLMC_CORPUS_DIR`` or ``<repo>/.cache/corpus``, then ``nemo-<version>-v<SCHEMA_VERSION>/``;
``case.json`` is written last.

Case directory layout (``<root>/<case>/``)::

    case.json               metadata: the Megatron case schema (tests/corpus/megatron_build.py) with kind "nemo2",
                            plus nemo_version; layout = {weights: facts of weights/, files: every file of nemo/}
    truth/final.safetensors what transformers' save_pretrained writes for the verified HF model
    hf/                     that model's config.json + tokenizer (tests/corpus/nemo_check.py also converts with it
                            as --base-model-name where model.yaml has no vocab_size, for the same weights)
    nemo/                   the NeMo 2 checkpoint: weights/ (metadata.json, .metadata, __0_*.distcp, common.pt),
                            context/ (io.json, model.yaml, nemo_tokenizer/)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from tests.corpus import cache
from tests.corpus.megatron_build import MegatronCaseSpec, _model

SCHEMA_VERSION = 1
KIND_REVISION: dict[str, int] = {}
#: The NeMo release that writes the case (constraints/nemo.txt pins the same).
NEMO_VERSION = "2.7.3"
REPO_ROOT = cache.REPO_ROOT

# A vocab_size set in the config is used unpadded; NeMo pads only a size it takes from the tokenizer.
_SPECS = [
    MegatronCaseSpec("nemo2_qwen2_fp32", "torch_dist",  # the megatron spec; kind "nemo2" in case.json
                     _model("qwen2", rope_base=1000000),
                     "NeMo 2 save by nemo_toolkit's own CPU path (MegatronStrategy on gloo, MegatronCheckpointIO, "
                     "io_dump): weights/ with module.-prefixed keys and Lightning's common.pt (no args), context/ "
                     "with model.yaml (Qwen2Config: QKV bias, vocab_size preset so unpadded) and nemo_tokenizer/; "
                     "fp32, untied, TP=1", seed=21),
    # Its covers text predates reading the vocabulary from the tokenizer (convert no longer needs the base model);
    # it is part of the spec hash, so changing it would rebuild the case (which needs the NeMo venv).
    MegatronCaseSpec("nemo2_llama_vocab_from_tokenizer", "torch_dist", _model("llama"),
                     "NeMo 2 save of llm.LlamaModel whose config leaves vocab_size None (NeMo's Llama presets): NeMo "
                     "pads the tokenizer's 480 to 512 rows and model.yaml records no vocabulary size, so convert "
                     "needs --base-model-name (exit 8 without); fp32, untied, TP=1", seed=22,
                     options={"vocab_from_tokenizer": True}),
]
CASES: dict[str, MegatronCaseSpec] = {c.name: c for c in _SPECS}

CACHE = cache.Cache(lambda: f"nemo-{NEMO_VERSION}-v{SCHEMA_VERSION}", "nemo-corpus")
case_dir = CACHE.case_dir
load_case = CACHE.load_case


def venv() -> Path:
    """The NeMo venv (``$NEMO_VENV`` or ``<repo>/.venv-nemo``, made by ``make setup-nemo``)."""
    return Path(os.environ.get("NEMO_VENV") or REPO_ROOT / ".venv-nemo")


def _plan(spec: MegatronCaseSpec) -> dict:
    plan = spec.plan(case_dir(spec.name))  # padded as Megatron-LM pads (128 x TP), as NeMo pads a tokenizer's size
    if not spec.options.get("vocab_from_tokenizer"):
        plan["model"]["padded_vocab"] = plan["model"]["vocab"]  # a preset vocab_size is used unpadded
    plan["meta"].update(padded_vocab_size=plan["model"]["padded_vocab"], input="nemo", kind="nemo2")
    return plan


def _build(specs: list[MegatronCaseSpec]) -> None:
    torchrun = cache.venv_torchrun(venv(), "`make setup-nemo` (scripts/setup_nemo_venv.sh)")
    CACHE.launch(torchrun, "nemo_save.py", 1, {"cases": [_plan(s) for s in specs]}, f"nemo_{specs[0].name}",
                 env={"DS_ACCELERATOR": None, "PYTHONPATH": str(REPO_ROOT)})


def _steps(todo: list[MegatronCaseSpec]) -> list[tuple[str, Callable[[], None]]]:
    # One launch per case: NeMo's trainer sets up the process group and model parallel state once per process.
    return [(f"nemo {s.name}", lambda s=s: _build([s])) for s in todo]


def build_all(names: list[str] | None = None, *, rebuild: bool = False, verbose: bool = False) -> dict[str, Path]:
    """Build the missing (or stale) cases; return ``{name: case_dir}``."""
    return CACHE.build([CASES[n] for n in (names or list(CASES))], _steps, rebuild=rebuild, verbose=verbose)


_COLUMNS: list[cache.Column] = [
    ("arch", "arch"),
    ("nemo", "nemo_version"),
    ("logits diff", lambda c: f"{c['checkpoints'][0]['logits_check']['max_abs_diff']:.1e}"),
    cache.PARAMS_COLUMN,
    cache.SECS_COLUMN,
]


def main(argv: list[str] | None = None) -> None:
    """CLI: build the corpus and print a summary table."""
    CACHE.cli(argv, doc=__doc__, cases=CASES, build_all=build_all, columns=_COLUMNS, title="nemo corpus")


if __name__ == "__main__":
    main()
