"""Every tokenizer family is found and copied as one set, and the copy encodes as the source does (issue 13).

Each family is written by the library that writes it in the wild, put next to a real DeepSpeed
checkpoint from the corpus (in place of its own tokenizer), and converted with the CLI's default
command (validation on, which loads the tokenizer too). The output must hold exactly the source's
tokenizer files, byte for byte, and ``AutoTokenizer`` must load it and encode a sample, with and
without special tokens, exactly as it encodes the source; special tokens and chat templates must
match.

Writers: ``tokenizers`` trains byte-level BPE, Unigram and WordPiece; ``sentencepiece``'s
``SentencePieceTrainer`` writes ``tokenizer.model`` / ``spiece.model`` / ``sentencepiece.bpe.model``;
transformers' ``save_pretrained`` writes ``tokenizer.json``, ``tokenizer_config.json``, chat templates
and ``added_tokens.json`` (GPT-SW3, a SentencePiece tokenizer with no ``tokenizer.json``). transformers
5 turns a SentencePiece model into a fast tokenizer through protobuf, which this venv lacks, so Llama,
T5 and XLM-R tokenizers are built from the pieces and scores the ``sentencepiece`` library reads from the
model file, as transformers' own extractor does. No installed library still writes
``special_tokens_map.json`` (transformers 4 did; 5 only reads it), so that family's map is written as
transformers 4 wrote it.

tiktoken and Mistral's tekken tokenizers need ``tiktoken`` (and mistral-common), which only the vLLM venv
has: those families are written and loaded there (``@pytest.mark.vllm``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.corpus.common import CHAT_TEMPLATE, corpus_text

from vllm_consolidate import cli
from vllm_consolidate.read.assets import find_assets, has_tokenizer, tokenizer_names
from vllm_consolidate.validate.tokenizer import ROUNDTRIP_SAMPLE

#: The checkpoints the tokenizers go next to (config and tokenizer in ckpt/; vocab_size 503 and 1001: every
#: tokenizer below is smaller). transformers 5 trusts tokenizer_config.json's class for a llama model; for
#: qwen2 it always builds Qwen2Tokenizer, a byte-level BPE of vocab.json + merges.txt, as Qwen repos have.
LLAMA, QWEN2 = "llama_z1_w1_fp32", "qwen2_z3_w2_bf16_tied"
SAMPLE = "The deep speed shard 1234 saves a tensor, then loads it again!"
MESSAGES = [{"role": "user", "content": "merge the shards"}, {"role": "assistant", "content": "done"}]
TOOL_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
#: Files of the corpus checkpoint folder that are not its tokenizer.
CHECKPOINT_FILES = {"config.json", "generation_config.json", "latest", "zero_to_fp32.py", "zero_to_torch.py"}
OUTPUT_FILES = {"config.json", "generation_config.json", "model.safetensors", ".vllm-consolidate.json"}
VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"

os.environ["HF_HUB_OFFLINE"] = "1"


# -- writers ---------------------------------------------------------------------------------------

def _lines() -> list[str]:
    # The validation's round-trip sample too: a tiny tokenizer without its letters would map them to <unk>.
    return corpus_text(300) + [SAMPLE, ROUNDTRIP_SAMPLE]


def _fast(tok, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def _byte_level_bpe(folder: Path) -> None:
    """tokenizers byte-level BPE; two chat templates: chat_template.jinja + additional_chat_templates/."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_lines(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = _fast(tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = {"default": CHAT_TEMPLATE, "tool_use": TOOL_TEMPLATE}
    fast.save_pretrained(folder)


def _unigram(folder: Path) -> None:
    """tokenizers Unigram; the chat template inside tokenizer_config.json (the pre-jinja-file format)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(_lines(), trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False))
    fast = _fast(tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder, save_jinja_files=False)


def _wordpiece(folder: Path) -> None:
    """tokenizers WordPiece ``vocab.txt``, loaded and saved by transformers' BertTokenizer (a BERT repo's set)."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizer

    wp = BertWordPieceTokenizer(lowercase=False)
    wp.train_from_iterator(_lines(), vocab_size=300, show_progress=False)
    wp.save_model(str(folder))
    BertTokenizer.from_pretrained(str(folder), do_lower_case=False).save_pretrained(folder)


def _bpe_pair(folder: Path) -> None:
    """``vocab.json`` + ``merges.txt`` alone, as the tokenizers library saves a byte-level BPE model."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_lines(), vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.save_model(str(folder))


def _gpt2(folder: Path) -> None:
    """The pair plus transformers' GPT2Tokenizer save (tokenizer.json, tokenizer_config.json): a GPT-2 repo."""
    from transformers import GPT2Tokenizer

    _bpe_pair(folder)
    GPT2Tokenizer.from_pretrained(str(folder)).save_pretrained(folder)


def _pair_and_config(folder: Path) -> None:
    """The pair with GPT2Tokenizer's tokenizer_config.json but no tokenizer.json (a slow-era GPT-2 repo)."""
    _gpt2(folder)
    (folder / "tokenizer.json").unlink()


def _spm(folder: Path, name: str, model_type: str, **extra) -> Path:
    import sentencepiece as spm

    prefix = folder / "spm"
    # Full character coverage: the default drops characters seen once (the sample's "q"), which then decode as <unk>.
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_lines()), model_prefix=str(prefix), model_type=model_type,
                                   character_coverage=1.0, minloglevel=2, **extra)
    (folder / "spm.vocab").unlink()
    return Path(shutil.move(str(prefix) + ".model", folder / name))


def _pieces(model: Path) -> list[tuple[str, float]]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    return [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]


def _llama(folder: Path) -> None:
    """SentencePiece BPE ``tokenizer.model`` (byte fallback) + LlamaTokenizer's tokenizer.json: a Llama repo."""
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import generate_merges

    model = _spm(folder, "tokenizer.model", "bpe", vocab_size=400, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2)
    vocab = {piece: i for i, (piece, _) in enumerate(_pieces(model))}
    LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab)).save_pretrained(folder)


def _t5(folder: Path) -> None:
    """SentencePiece Unigram ``spiece.model`` + T5Tokenizer's files: a T5 repo."""
    from transformers import T5Tokenizer

    model = _spm(folder, "spiece.model", "unigram", vocab_size=250, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    T5Tokenizer(vocab=_pieces(model), extra_ids=0).save_pretrained(folder)


def _xlmr(folder: Path) -> None:
    """``sentencepiece.bpe.model`` (a Unigram model, despite the name) + XLMRobertaTokenizer's files."""
    from transformers import XLMRobertaTokenizer

    model = _spm(folder, "sentencepiece.bpe.model", "unigram", vocab_size=250)
    XLMRobertaTokenizer(vocab=_pieces(model)).save_pretrained(folder)


def _gpt_sw3(folder: Path) -> None:
    """GPT-SW3: a SentencePiece-backed tokenizer; save_pretrained writes spiece.model and added_tokens.json."""
    from transformers import GPTSw3Tokenizer

    model = _spm(folder, "spiece.model", "unigram", vocab_size=250)
    tok = GPTSw3Tokenizer(vocab_file=str(model), name_or_path="gpt-sw3")
    tok.add_tokens(["<|user|>", "<|bot|>"])
    model.unlink()
    tok.save_pretrained(folder)


def _special_tokens_map(folder: Path) -> None:
    """Special tokens only in special_tokens_map.json, which transformers 5 still reads (no added_tokens_decoder)."""
    _byte_level_bpe(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    special = {k: config.pop(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


#: family -> (writer, corpus case of the model it goes with)
FAMILIES: dict[str, tuple[Callable[[Path], None], str]] = {
    "byte_level_bpe_tokenizer_json": (_byte_level_bpe, LLAMA),
    "unigram_template_in_config": (_unigram, LLAMA),
    "wordpiece_vocab_txt": (_wordpiece, LLAMA),  # converted without validation: see NO_VALIDATION
    "bpe_vocab_merges_only": (_bpe_pair, QWEN2),
    "bpe_vocab_merges_config": (_pair_and_config, LLAMA),
    "gpt2_vocab_merges_tokenizer_json": (_gpt2, LLAMA),
    "llama_tokenizer_model": (_llama, LLAMA),
    "t5_spiece_model": (_t5, LLAMA),
    "xlmr_sentencepiece_bpe_model": (_xlmr, LLAMA),
    "gpt_sw3_added_tokens": (_gpt_sw3, LLAMA),
    "special_tokens_map": (_special_tokens_map, LLAMA),
}

#: BERT's WordPiece decoder spaces punctuation ("dog : 12345, 67. 8"), which the validation's round trip
#: refuses; the copy is still compared with the source below.
NO_VALIDATION = {"wordpiece_vocab_txt"}


# -- the checkpoint and the comparison --------------------------------------------------------------

def _checkpoint(corpus: dict[str, Path], case: str, dst: Path, write: Callable[[Path], None]) -> Path:
    """A copy of a corpus checkpoint whose tokenizer files are replaced by ``write``'s."""
    shutil.copytree(corpus[case] / "ckpt", dst)
    for p in dst.iterdir():
        if p.is_file() and p.name not in CHECKPOINT_FILES:
            p.unlink()
    write(dst)
    return dst


def _files(folder: Path, skip: set[str]) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.relative_to(folder).parts[0] not in skip and not p.parts[-2].startswith("global_step")}


def _behaviour(folder: Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    out = {"class": type(tok).__name__, "ids": tok.encode(SAMPLE), "len": len(tok),
           "plain": tok.encode(SAMPLE, add_special_tokens=False),
           "special": dict(zip(tok.all_special_tokens, tok.all_special_ids)), "template": tok.chat_template}
    if tok.chat_template:
        out["chat"] = tok.apply_chat_template(MESSAGES, tokenize=False)
    return out


def _expected_class(folder: Path) -> str:
    """The class tokenizer_config.json names (the generic fast class loads as TokenizersBackend)."""
    name = json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class", "")
    return "TokenizersBackend" if name in ("PreTrainedTokenizerFast", "TokenizersBackend") else name


def _convert(src: Path, out: Path, *extra: str) -> str:
    code = cli.convert_main(["--input", str(src), "--output", str(out), *extra])
    assert code == 0
    return out.name


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_is_copied_as_a_set_and_encodes_the_same(family, corpus, tmp_path, capsys):
    write, case = FAMILIES[family]
    src = _checkpoint(corpus, case, tmp_path / "ckpt", write)
    expected = _files(src, CHECKPOINT_FILES)
    assert has_tokenizer(tokenizer_names(src)), sorted(expected)
    out = tmp_path / "out"
    _convert(src, out, *(["--no-validate-vllm"] if family in NO_VALIDATION else []))
    printed = capsys.readouterr().out
    assert f"tokenizer:  {src}\n" in printed and f"generation: {src / 'generation_config.json'}\n" in printed
    assert _files(out, OUTPUT_FILES) == expected  # the same names, byte for byte
    source, copy = _behaviour(src), _behaviour(out)
    assert copy == source
    assert len(source["plain"]) > 3 and source["len"] < 503  # a real tokenizer, not an unknown-token stream
    assert source["class"] == ("Qwen2Tokenizer" if case == QWEN2 else _expected_class(src))


def test_the_families_use_every_name_they_are_meant_to(corpus, tmp_path):
    """The families above do write each kind of file this module is about."""
    seen: set[str] = set()
    for name, (write, _) in FAMILIES.items():
        folder = tmp_path / name
        folder.mkdir()
        write(folder)
        seen |= set(tokenizer_names(folder))
    assert seen >= {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "merges.txt",
                    "vocab.txt", "chat_template.jinja", "additional_chat_templates/tool_use.jinja"}


# -- generation config: the checkpoint, its parents, then the base model --------------------------------

def test_generation_config_from_the_base_model_is_named_in_the_summary(corpus, tmp_path, capsys):
    src = _checkpoint(corpus, LLAMA, tmp_path / "ckpt", lambda d: None)
    (src / "generation_config.json").unlink()
    base = tmp_path / "base"
    base.mkdir()
    for name in ("config.json", "generation_config.json"):
        shutil.copy(corpus[LLAMA] / "ckpt" / name, base / name)
    out = tmp_path / "out"
    _convert(src, out, "--base-model-name", str(base), "--json")
    record = json.loads(capsys.readouterr().out)
    assert record["assets"]["generation_config"] == str(base / "generation_config.json")
    assert record["assets"]["config"] == str(src / "config.json")
    assert (out / "generation_config.json").read_bytes() == (base / "generation_config.json").read_bytes()


# -- the finder on names no installed library writes --------------------------------------------------

@pytest.mark.parametrize(("names", "is_tokenizer"), [
    (["vocab.json", "merges.txt"], True),
    (["vocab.json"], False),
    (["merges.txt", "tokenizer_config.json"], True),
    (["vocab.txt"], False),  # alone it may be any vocabulary file; it comes along with a tokenizer
    (["qwen.tiktoken", "tokenizer_config.json"], True),
    (["qwen.tiktoken"], True),
    (["tiktoken.model"], True),
    (["tokenizer.model.v7", "tekken.json"], True),
    (["tokenizer.model.v3"], True),
    (["chat_template.jinja", "chat_template.json", "special_tokens_map.json", "added_tokens.json"], False),
])
def test_what_makes_a_tokenizer(names, is_tokenizer, tmp_path):
    for n in names:
        (tmp_path / n).write_text("{}")
    assert has_tokenizer(tokenizer_names(tmp_path)) is is_tokenizer


def test_the_whole_set_comes_from_one_folder(tmp_path):
    """Every file of the set, patterns and sub-folder included, from the nearest folder with a tokenizer."""
    near, far = tmp_path / "run" / "checkpoint-2", tmp_path / "run"
    (near / "additional_chat_templates").mkdir(parents=True)
    names = ["tokenizer.model", "tokenizer.model.v7", "tekken.json", "qwen.tiktoken", "tiktoken.model",
             "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json", "chat_template.json",
             "chat_template.jinja", "additional_chat_templates/tool_use.jinja"]
    for n in names:
        (near / n).write_text("x")
    (near / "notes.txt").write_text("not a tokenizer file")
    for n in ("tokenizer.json", "vocab.json", "merges.txt"):
        (far / n).write_text("{}")
    assets = find_assets([near, far], None)
    assert assets.tokenizer_dir == near
    assert sorted(p.relative_to(near).as_posix() for p in assets.tokenizer_files) == sorted(names)


def test_a_chat_template_alone_does_not_hide_the_tokenizer_above_it(tmp_path):
    near, far = tmp_path / "run" / "checkpoint-2", tmp_path / "run"
    near.mkdir(parents=True)
    (near / "chat_template.jinja").write_text("{{ x }}")
    (far / "vocab.json").write_text("{}")
    (far / "merges.txt").write_text("#version: 0.2\n")
    assets = find_assets([near, far], None)
    assert assets.tokenizer_dir == far and {p.name for p in assets.tokenizer_files} == {"vocab.json", "merges.txt"}


# -- tiktoken and tekken, written and read in the vLLM venv (which has tiktoken and mistral-common) -------

_VENV_SCRIPT = r'''
import base64, json, sys, types
from pathlib import Path
mode, root = sys.argv[1], Path(sys.argv[2])
sample = sys.argv[3]
if mode == "write":
    from tokenizers import ByteLevelBPETokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(json.loads(sys.argv[4]), vocab_size=400, show_progress=False)
    merges = json.loads(bpe._tokenizer.to_str())["model"]["merges"]
    byte_of = {u: b for b, u in bytes_to_unicode().items()}
    ranks = {bytes([b]): b for b in range(256)}  # tiktoken ranks: the bytes, then each merge in order
    for merge in merges:
        a, b = merge if isinstance(merge, list) else merge.split(" ")
        ranks.setdefault(bytes(byte_of[ch] for ch in a + b), len(ranks))
    # tiktoken's own writer; it opens its file through blobfile, which is not installed: plain open does.
    sys.modules["blobfile"] = types.SimpleNamespace(BlobFile=open)
    from tiktoken.load import dump_tiktoken_bpe
    dump_tiktoken_bpe(ranks, str(root / "tiktoken" / "tiktoken.model"))
    # mistral-common reads tekken.json but has no writer: the file below is its documented TekkenConfig.
    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"] + [f"<SPECIAL_{i}>" for i in range(5, 10)]
    vocab = [{"rank": r, "token_bytes": base64.b64encode(t).decode(), "token_str": t.decode("utf-8", "replace")}
             for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    pattern = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    (root / "tekken" / "tekken.json").write_text(json.dumps({
        "config": {"pattern": pattern, "num_vocab_tokens": len(vocab), "default_vocab_size": len(vocab) + 10,
                   "default_num_special_tokens": 10, "version": "v7"},
        "vocab": vocab, "special_tokens": [{"rank": i, "token_str": s, "is_control": True}
                                           for i, s in enumerate(specials)], "version": 1, "type": "Tekken"}))
else:
    from transformers import AutoTokenizer
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    out = {}
    for folder in sys.argv[4:]:
        tok = AutoTokenizer.from_pretrained(folder)
        out[folder] = {"ids": tok.encode(sample, add_special_tokens=False), "len": len(tok)}
        if (Path(folder) / "tekken.json").exists():
            tekken = Tekkenizer.from_file(Path(folder) / "tekken.json")
            out[folder]["mistral_common"] = tekken.encode(sample, False, False)
    print(json.dumps(out))
'''


def _venv(*args: str) -> str:
    if not os.access(VLLM_PYTHON, os.X_OK):
        pytest.fail(f"no vLLM interpreter at {VLLM_PYTHON}: run scripts/setup_vllm_venv.sh", pytrace=False)
    proc = subprocess.run([str(VLLM_PYTHON), "-c", _VENV_SCRIPT, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.vllm
def test_tiktoken_and_tekken_files_are_copied_and_encode_the_same(corpus, tmp_path):
    """``tiktoken.model`` (tiktoken's writer) and ``tekken.json`` (read by mistral-common), alone in the folder.

    This venv has no tiktoken, so its validation cannot load them: converted with --no-validate-vllm,
    then loaded with AutoTokenizer (and mistral-common) in the vLLM venv.
    """
    writers = {"tiktoken": tmp_path / "writer" / "tiktoken", "tekken": tmp_path / "writer" / "tekken"}
    for folder in writers.values():
        folder.mkdir(parents=True)
    _venv("write", str(tmp_path / "writer"), SAMPLE, json.dumps(_lines()))
    folders: list[str] = []
    for name, written in writers.items():
        src = _checkpoint(corpus, LLAMA, tmp_path / f"ckpt-{name}",
                          lambda d, w=written: shutil.copytree(w, d, dirs_exist_ok=True))
        out = tmp_path / f"out-{name}"
        _convert(src, out, "--no-validate-vllm")
        assert _files(out, OUTPUT_FILES) == _files(src, CHECKPOINT_FILES) == _files(written, set())
        folders += [str(src), str(out)]
    encoded = json.loads(_venv("encode", str(tmp_path), SAMPLE, *folders))
    for src, out in zip(folders[::2], folders[1::2]):
        assert encoded[out] == encoded[src] and len(encoded[src]["ids"]) > 3
    tekken = encoded[folders[-1]]
    assert tekken["ids"] == tekken["mistral_common"]


if __name__ == "__main__":  # pragma: no cover - one family, to look at: PYTHONPATH=. python THIS_FILE NAME DIR
    FAMILIES[sys.argv[1]][0](Path(sys.argv[2]))
