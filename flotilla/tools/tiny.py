"""Tiny random Hugging Face checkpoints, built locally.

Nothing can be downloaded where Flotilla's demo and tests run, so every checkpoint they use is made here: a
byte-level BPE tokenizer trained in a fraction of a second on a built-in English corpus, and a few-layer model of
one of transformers' own architectures (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``,
``Qwen3MoeForCausalLM``) with deterministic random weights, saved with ``save_pretrained`` exactly as a real
checkpoint would be. Because the reference implementation is transformers itself, tests can compare Flotilla's
tokens with ``model.generate`` token for token.

Two design points matter for those comparisons:

* Weights are drawn with a fan-in scaled init (std ``1.5/sqrt(fan_in)``; LM head and embeddings
  ``3/sqrt(hidden)``) instead of HF's ``initializer_range=0.02``. With 0.02 the logits of a tiny model are nearly
  uniform, greedy decoding meets near-ties, and any harmless float reordering flips tokens. Here the logits have a
  standard deviation of about 3 (median top-1/top-2 gap about 0.6, under 1% of steps below 1e-3), and the layers
  outweigh the embedding, so 48 greedy tokens typically hold 30-45 distinct ids rather than a short loop. The
  residual stream stays small (RMS under 10, max under 50, even at 8 layers).
* Norm weights and biases are perturbed away from HF's ones/zeros, so a loader that forgets to load them produces
  different tokens instead of passing by accident.

Public API: :func:`build_tiny_model`, :func:`tiny_model_path` (a cached build), :func:`build_tokenizer` and
:func:`cli_main` (``flotilla make-tiny-model``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

from flotilla.errors import InvalidParameter

# Bump whenever anything that changes the files written here changes, so stale cache entries are not reused.
# (The cache key also hashes this file's source, so forgetting to bump costs nothing but a rebuild.)
VERSION = 2

ARCHS: tuple[str, ...] = ("llama", "qwen2", "qwen3", "qwen3_moe")

# Special tokens come first in the vocabulary, so their ids are fixed: 0..4. bos=1, eos=2 match LlamaConfig's
# defaults, which keeps a half-configured reader from silently disagreeing with us.
PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN)
PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID, IM_START_TOKEN_ID, IM_END_TOKEN_ID = range(len(SPECIAL_TOKENS))

# 256 byte tokens + 5 special tokens + 251 merges. A power of two so every tensor-parallel size up to 8 (and more)
# splits the vocabulary evenly; the corpus below is large enough for the trainer to reach it exactly.
VOCAB_SIZE = 512

# Scaled init (see the module docstring): hidden weights use std GAIN/sqrt(fan_in).
HIDDEN_GAIN = 1.5  # above 1 so each layer outweighs the token embedding: greedy text varies instead of looping
LOGIT_GAIN = 3.0  # embeddings and LM head: logits' std is about this, tied or not
ROUTER_GAIN = 2.0  # MoE router: clear top-k margins, so expert choice does not flip on float noise
NORM_JITTER = 0.1  # norm weights: 1 + NORM_JITTER * N(0, 1)
BIAS_STD = 0.2

# Known-good llama3 rope scaling for the tiny geometry (head_dim 16, theta 1e4, max_position_embeddings 1024):
# with original_max_position_embeddings=256 the 8 rotary frequencies fall in all three llama3 regimes (kept,
# smoothed, divided by `factor`), so every branch of the scaling code is exercised.
ROPE_PRESETS: dict[str, dict[str, Any]] = {
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
    },
}

# Qwen2's (and, up to digit grouping, Llama 3's) pre-tokenizer regex, as in transformers' tokenization_qwen2.py.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501
)

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- elif message['content'] is not none %}"
    "{%- for part in message['content'] %}{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CORPUS = """\
The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome, and the capital
of Spain is Madrid. The capital of Japan is Tokyo. Paris is a large city on the river Seine, and many people visit
it every year to see the museums, the old bridges and the tall iron tower that stands near the water.
France is a country in Europe, and the people of France speak French. The capital of France is Paris.

Hello! Hello, world. Hello there, how are you today? I am fine, thank you. Hello again, my friend. It is nice to
see you. What would you like to do this afternoon? We could walk to the park, read a book, or cook a warm dinner.

Once upon a time there was a little fox who lived in a deep green forest near the river. Every morning the fox
walked down to the water to drink and to watch the fish swim by in the cold clear current. Once upon a time there
was also a wise old owl who lived in the tallest tree of the forest, and the owl knew the name of every star.
One day the fox asked the owl, "Why is the sky blue?" The owl thought for a long time and then said, "Because the
light of the sun is scattered by the air, and blue light is scattered the most."
Every story the owl told began the same way: once upon a time. Once upon a time, said the owl, and the fox
listened until the stars came out.

The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog again and again, because
the dog is very lazy and the fox is very quick. A small bird sang in the garden while the children played.

Machine learning models read text as tokens. A tokenizer splits the text into pieces, and each piece has a
number. The model reads the numbers, computes a score for every possible next token, and the next token is chosen
from those scores. When the model writes one token at a time, we call it generation. Large language models are
trained on a great deal of text, and they learn which words are likely to follow other words.

In the beginning the village was quiet. The farmers worked in the fields from morning until evening, the baker
made fresh bread before the sun came up, and the teacher told the children stories about kings, queens, dragons
and ships that sailed across the sea to distant lands. On Sundays everyone met in the market square.

Numbers: one, two, three, four, five, six, seven, eight, nine, ten. 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 100, 1000.
Days: Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday. Colors: red, orange, yellow, green, blue,
purple, black, white. Questions: who, what, where, when, why, how? Answers: yes, no, maybe, of course, never.

A chat has messages from the system, the user and the assistant. The system message says how the assistant
should behave. The user asks a question, and the assistant answers it in a helpful, honest and short way.

def hello(name):
    return "Hello, " + name + "!"

for i in range(10):
    print(i * i)
"""


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_json() -> str:
    """Train the byte-level BPE once per process and keep it as JSON (a ``Tokenizer`` object is mutable).

    The pre-tokenizer is exactly the one transformers' ``Qwen2Tokenizer`` rebuilds (see :func:`_backend`), so
    every way of loading the saved tokenizer agrees. Training is deterministic: the corpus is fixed and ASCII.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = _backend(Tokenizer(models.BPE()), nfc=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer trained to {tok.get_vocab_size()} tokens, expected {VOCAB_SIZE}")
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"special token {t!r} got id {tok.token_to_id(t)}, expected {i}")
    return tok.to_str()


def _backend(tok, *, nfc: bool):
    """Give ``tok`` the Qwen2/Llama-3 style byte-level pipeline: regex split, then bytes to printable characters.

    No prefix space and (without ``nfc``) no normalizer, so ``decode(encode(x)) == x`` for any string. ``nfc`` adds
    the NFC normalizer real Qwen tokenizers have; transformers 5 forces ``Qwen2Tokenizer`` (which always adds it)
    on model_type ``qwen2`` whatever tokenizer.json says, so the qwen family must carry it to stay consistent.
    """
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers

    tok.normalizer = normalizers.NFC() if nfc else None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def is_qwen(arch: str) -> bool:
    """The Qwen family (qwen2, qwen3, qwen3_moe) shares Qwen's tokenizer conventions."""
    return arch.startswith("qwen")


def adds_bos(arch: str) -> bool:
    """Whether ``arch``'s tokenizer prepends ``<|begin_of_text|>``: llama does (as Llama 3 does), Qwen does not."""
    return not is_qwen(arch)


def chat_template(arch: str) -> str:
    """The ChatML Jinja template; llama's starts with the BOS token, since chat templates are tokenized without
    special tokens (that is what real Llama 3 templates do)."""
    return ("{{- bos_token }}" if adds_bos(arch) else "") + CHATML_TEMPLATE


def build_tokenizer(arch: str = "llama"):
    """A ``PreTrainedTokenizerFast`` around the trained BPE, with bos/eos/pad and a ChatML chat template.

    This is the object that gets saved; what ``AutoTokenizer`` loads back from the folder (a ``Qwen2Tokenizer`` for
    the qwen family) tokenizes identically, and is what tests should use.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    _check_arch(arch)
    return PreTrainedTokenizerFast(
        tokenizer_object=_backend(Tokenizer.from_str(_trained_tokenizer_json()), nfc=is_qwen(arch)),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START_TOKEN, IM_END_TOKEN],
        add_bos_token=adds_bos(arch),
        add_eos_token=False,
        clean_up_tokenization_spaces=False,  # it would turn " ." into "." and break exact round trips
        chat_template=chat_template(arch),
        model_max_length=1024,
    )


def save_tokenizer(tokenizer, out_dir: pathlib.Path, arch: str) -> None:
    """``save_pretrained`` plus two fixes to tokenizer_config.json that make ``AutoTokenizer`` load it faithfully.

    * ``"unk_token": null``: otherwise ``Qwen2Tokenizer`` invents ``<|endoftext|>`` as unk and appends it as token
      512, one past the model's vocabulary.
    * ``tokenizer_class``: ``Qwen2Tokenizer`` for the qwen family, as real Qwen checkpoints say (qwen2 gets that
      class regardless), and the generic ``TokenizersBackend`` (v4's ``PreTrainedTokenizerFast``) for llama.
    """
    tokenizer.save_pretrained(out_dir)
    path = out_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["unk_token"] = None
    cfg["tokenizer_class"] = "Qwen2Tokenizer" if is_qwen(arch) else "TokenizersBackend"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise InvalidParameter("arch", f"{arch!r} is not supported; choose one of {', '.join(ARCHS)}")


def _model_classes(arch: str) -> tuple[type, type]:
    """transformers' own (config class, model class) for ``arch``."""
    import transformers as tf

    _check_arch(arch)
    return {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM),
    }[arch]


def default_config(arch: str) -> dict[str, Any]:
    """The tiny defaults for ``arch``, as config keyword arguments (before overrides).

    Everything is spelled out, including fields whose HF default happens to be right, so a change of defaults in a
    future transformers does not silently change our checkpoints (e.g. Qwen3's ``head_dim`` defaults to 128).
    """
    _check_arch(arch)
    cfg: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        hidden_act="silu",
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
        initializer_range=0.02,  # unused: the weights are drawn by _init_weights
        use_cache=True,
        dtype="float32",
    )
    if arch in ("qwen2", "qwen3", "qwen3_moe"):
        cfg.update(use_sliding_window=False)
    if arch == "qwen3_moe":
        cfg.update(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    # qwen2 needs nothing for its q/k/v bias: Qwen2Attention always has it (there is no attention_bias field).
    return cfg


def _resolve_rope(cfg: dict[str, Any]) -> None:
    """Fold every way of asking for rope settings into one ``rope_parameters`` dict, in place.

    transformers 5 keeps all rope settings (``rope_type``, ``rope_theta``, scaling keys) in ``config.rope_parameters``;
    the v4 spellings ``rope_scaling={...}`` and a top-level ``rope_theta`` are accepted here and moved in. A string
    names a preset of :data:`ROPE_PRESETS` (hashable, so it works through ``functools.lru_cache``-d helpers).
    """
    rope = cfg.pop("rope_parameters")
    if "rope_scaling" in cfg:
        rope = cfg.pop("rope_scaling")
    if isinstance(rope, str):
        if rope not in ROPE_PRESETS:
            raise InvalidParameter("rope_parameters",
                                   f"unknown preset {rope!r}; choose one of {', '.join(ROPE_PRESETS)}")
        rope = ROPE_PRESETS[rope]
    rope = dict(rope or {})
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    rope.setdefault("rope_type", "default")
    if "rope_theta" in cfg:
        rope["rope_theta"] = cfg.pop("rope_theta")
    rope.setdefault("rope_theta", 10000.0)
    cfg["rope_parameters"] = rope


def _check_overrides(arch: str, config_cls: type, overrides: Mapping[str, Any]) -> None:
    """Reject override names the config does not know: transformers configs silently keep any keyword, so a typo
    such as ``num_layers=2`` would otherwise build the default model without a word."""
    known = {f.name for f in dataclasses.fields(config_cls)} if dataclasses.is_dataclass(config_cls) else set()
    known |= set(getattr(config_cls, "attribute_map", {})) | set(default_config(arch)) | {"rope_scaling", "rope_theta"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise InvalidParameter("config_overrides",
                               f"{config_cls.__name__} has no field {', '.join(map(repr, unknown))}")


def make_config(arch: str = "llama", **overrides: Any):
    """The transformers config object for a tiny ``arch`` model; ``overrides`` win over :func:`default_config`."""
    config_cls, _ = _model_classes(arch)
    _check_overrides(arch, config_cls, overrides)
    cfg = default_config(arch)
    cfg.update(copy.deepcopy(overrides))
    _resolve_rope(cfg)
    if "head_dim" not in overrides and ("hidden_size" in overrides or "num_attention_heads" in overrides):
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]  # keep the default geometry consistent
    return config_cls(**cfg)


# ----------------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------------


def _init_weights(model, seed: int) -> None:
    """Draw every parameter from a generator seeded with ``seed`` (see the module docstring for the scales).

    Parameters are visited by name in sorted order, so the result depends on ``seed`` and the parameter set only,
    not on how transformers happens to initialise modules. Tied weights are visited once.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(remove_duplicate=True), key=lambda kv: kv[0]):
            if id(param) in seen:
                continue
            seen.add(id(param))
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            param.copy_(_scaled(name, param, noise))


def _scaled(name: str, param, noise):
    """Scale standard-normal ``noise`` for the parameter called ``name``."""
    if param.ndim == 1:
        if name.endswith("bias"):
            return noise * BIAS_STD
        return 1.0 + NORM_JITTER * noise  # RMSNorm weights (input/post-attention/final/q_norm/k_norm)
    fan_in = param.shape[-1]  # Linear [out, in], Embedding [vocab, hidden], fused experts [E, out, in]
    if "embed_tokens" in name or "lm_head" in name:
        gain = LOGIT_GAIN
    elif name.endswith("mlp.gate.weight"):
        gain = ROUTER_GAIN
    else:
        gain = HIDDEN_GAIN
    return noise * (gain / math.sqrt(fan_in))


# ----------------------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------------------


def build_tiny_model(
    out_dir: str | os.PathLike,
    arch: str = "llama",
    *,
    seed: int = 0,
    max_shard_size: str | int | None = None,
    **config_overrides: Any,
) -> pathlib.Path:
    """Build a tiny random ``arch`` checkpoint (weights, config, tokenizer, generation config) into ``out_dir``.

    Args:
        out_dir: folder to write; created if missing. Loadable afterwards with ``AutoModelForCausalLM`` and
            ``AutoTokenizer.from_pretrained(out_dir)``.
        arch: one of :data:`ARCHS` ("llama", "qwen2", "qwen3", "qwen3_moe").
        seed: the weights are a deterministic function of ``seed`` (and of the config).
        max_shard_size: passed to ``save_pretrained``; e.g. ``"50KB"`` writes several ``model-0000x-of-0000y``
            safetensors files plus ``model.safetensors.index.json``. ``None`` writes one ``model.safetensors``.
        **config_overrides: any config field, e.g. ``num_key_value_heads=1``, ``head_dim=24``,
            ``tie_word_embeddings=True``, ``num_hidden_layers=2``. Rope settings live in ``rope_parameters``
            (transformers 5). For llama3 rope scaling pass ``rope_parameters="llama3"`` (the preset in
            :data:`ROPE_PRESETS`) or a full dict: ``rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0,
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings":
            256}``. The v4 spellings ``rope_scaling={...}`` and ``rope_theta=...`` are accepted and moved into it.

    Returns:
        ``out_dir`` as a ``pathlib.Path``.

    Raises:
        ValueError: ``arch`` is unknown, or the config is invalid.
    """
    import torch

    _check_arch(arch)
    out = pathlib.Path(out_dir)
    config = make_config(arch, **config_overrides)
    tokenizer = build_tokenizer(arch)
    if config.vocab_size < len(tokenizer):
        raise InvalidParameter("vocab_size",
                               f"{config.vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    _, model_cls = _model_classes(arch)
    with torch.random.fork_rng(devices=[]):  # transformers' own init draws from the global RNG: leave it alone
        torch.manual_seed(seed)
        model = model_cls(config).to(torch.float32).eval()
    _init_weights(model, seed)

    out.mkdir(parents=True, exist_ok=True)
    save_kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    with _quiet_progress_bars():
        model.save_pretrained(out, **save_kwargs)
    _hub_style_config(out)
    save_tokenizer(tokenizer, out, arch)
    _generation_config(config).save_pretrained(out)
    return out


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Silence transformers' "Writing model shards" bar (noise in test and demo output), then restore the setting."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _hub_style_config(out_dir: pathlib.Path) -> None:
    """Spell config.json the way real checkpoints on the Hub do.

    transformers 5 writes Qwen3-MoE's expert count as ``num_local_experts`` (its ``attribute_map`` target), while
    real Qwen3-MoE checkpoints say ``num_experts``; ``AutoConfig`` reads either, raw-JSON readers may not.
    """
    path = out_dir / "config.json"
    cfg = json.loads(path.read_text())
    if cfg.get("model_type") == "qwen3_moe" and "num_local_experts" in cfg:
        cfg["num_experts"] = cfg.pop("num_local_experts")
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _generation_config(config) -> Any:
    """Greedy by default, with the same bos/eos/pad ids as the model config."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=False,
    )


# ----------------------------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------------------------


def cache_root() -> pathlib.Path:
    """``$FLOTILLA_TINY_CACHE``, or ``~/.cache/flotilla/tiny``."""
    env = os.environ.get("FLOTILLA_TINY_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "flotilla" / "tiny"


def cache_key(arch: str, seed: int, max_shard_size: str | int | None, overrides: Mapping[str, Any]) -> str:
    """A short stable hash of everything that determines the files: the arguments, :data:`VERSION`, this module's
    source, and the library versions (transformers decides the saved layout, e.g. of MoE experts)."""
    import tokenizers
    import transformers

    blob = json.dumps(
        dict(v=VERSION, arch=arch, seed=seed, shard=max_shard_size, overrides=dict(overrides),
             transformers=transformers.__version__, tokenizers=tokenizers.__version__, source=_source_digest()),
        sort_keys=True,
        default=repr,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
    """A digest of this module's source: an edit here invalidates old cache entries even without a VERSION bump."""
    return hashlib.sha256(pathlib.Path(__file__).read_bytes()).hexdigest()[:16]


def tiny_model_path(
    arch: str = "llama", *, seed: int = 0, max_shard_size: str | int | None = None, **overrides: Any
) -> pathlib.Path:
    """The folder of a tiny checkpoint, built on first use and reused afterwards (by every process).

    The folder is ``<cache_root()>/<arch>-<hash>`` (see :func:`cache_key`). It is built in a temporary sibling folder
    and renamed into place, so a reader never sees a half-written checkpoint, and when two processes race the loser's
    copy is discarded.
    """
    _check_arch(arch)
    root = cache_root()
    final = root / f"{arch}-{cache_key(arch, seed, max_shard_size, overrides)}"
    if _is_complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _temp_dir(root, prefix=f".{final.name}.") as tmp:
        build_tiny_model(tmp, arch, seed=seed, max_shard_size=max_shard_size, **overrides)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_complete(final):  # not a lost race: a real error
                raise
    return final


def _is_complete(path: pathlib.Path) -> bool:
    """A cache entry exists only after its rename, so its config and tokenizer being there means it is whole."""
    return (path / "config.json").is_file() and (path / "tokenizer.json").is_file()


@contextlib.contextmanager
def _temp_dir(parent: pathlib.Path, prefix: str) -> Iterator[pathlib.Path]:
    """A temporary folder in ``parent`` (same filesystem, so the rename is atomic), removed unless renamed away."""
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache entry it becomes should read like any folder
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def cli_main(argv: list[str] | None = None) -> int:
    """``flotilla make-tiny-model OUT --arch ARCH [--seed N] [--shard-size 50KB]``: build and print the folder."""
    parser = argparse.ArgumentParser(prog="flotilla make-tiny-model",
                                     description="Build a tiny random Hugging Face checkpoint (no download).")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--arch", default="llama", choices=ARCHS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", default=None, help='max shard size, e.g. "50KB" (default: one file)')
    args = parser.parse_args(argv)
    path = build_tiny_model(args.out, args.arch, seed=args.seed, max_shard_size=args.shard_size)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main())
