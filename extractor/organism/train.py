"""Train the model organism: a small interleaved speech-text LM in SIMS layout, on the CPU.

Variants (the paper's training ablations, in miniature):
* ``interleaved``: text-initialised (a text-only phase first), then trained on a mix of
  interleaved, text-only and speech-only sequences;
* ``random-init``: the same mix, from random weights;
* ``speech-only``: text-initialised, then speech-only sequences (and some text).

Everything is generated here: the corpus (``grammar``), speech for each word from
espeak-ng in several voices, units from the light acoustic tokenizer (``acoustic``)
over the joined sentence audio, exactly as the front end computes them at analysis time.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from extractor.speech.audio import SAMPLE_RATE
from extractor.speech.fbank import FbankKMeansTokenizer
from extractor.speech.layouts import layout_from_config
from extractor.speech.records import Utterance
from extractor.speech.sequence import ModalityRule, build_sequence
from extractor.speech.synth import Voice, espeak_word, join_clips

from .grammar import Grammar, vocabulary

VARIANTS = ("interleaved", "random-init", "speech-only")
VOICES = [
    Voice("en-us", 150, 40),
    Voice("en-gb", 170, 60),
    Voice("en-us", 185, 75),
    Voice("en-gb", 160, 30),
]
#: Voices no organism hears in training: held-out sentences are spoken by these, so the
#: study measures words, not memorised renderings of them.
HELDOUT_VOICES = [
    Voice("en-us", 135, 55),
    Voice("en-gb", 195, 45),
]


@dataclass
class OrganismSpec:
    variant: str = "interleaved"
    seed: int = 0
    steps: int = 630  # optimizer steps (the time they take is only estimated)
    n_units: int = 200
    layers: int = 6
    hidden: int = 256
    heads: int = 4
    context: int = 256
    batch: int = 16
    lr: float = 1e-3
    speech_pool: int = 4000  # sentences rendered to audio/units for training
    renderings: int = 4
    text_fraction: float = 0.4  # share of the steps spent in the text phase


#: Seconds per step of the default spec, measured on the development machine (2 cores):
#: only for the estimate printed before training; training is bounded by steps.
SECONDS_PER_STEP = 0.67


def estimated_minutes(spec: OrganismSpec) -> float:
    scale = (spec.hidden / 256) ** 2 * spec.layers / 6 * spec.batch * spec.context / 4096
    return spec.steps * SECONDS_PER_STEP * scale / 60


def layout_spec(n_units: int) -> dict:
    """The organism's vocabulary layout: SIMS, with its own number of units."""
    return {
        "name": "organism",
        "unit_format": "<Un{}>",
        "n_units": n_units,
        "speech_marker": "<speech>",
        "text_marker": "<text>",
    }


def build_tokenizer(words: list[str], n_units: int):
    """A word-level tokenizer in SIMS layout: words, then <Un0>..<Un{n-1}>, <speech>, <text>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    units = [f"<Un{i}>" for i in range(n_units)]
    vocab = {t: i for i, t in enumerate(specials + words + units + ["<speech>", "<text>"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Every sequence starts with <s>, in training (packed) and at analysis time alike:
    # the sequence builder puts it first when the tokenizer adds it.
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


class WordBank:
    """Every vocabulary word rendered by espeak-ng in several voices (16 kHz)."""

    def __init__(self, words: list[str], renderings: int) -> None:
        self.audio = {w: [espeak_word(w, v) for v in VOICES[:renderings]] for w in words}

    def sentence(self, words: list[str], rng: np.random.Generator):
        """Joined audio and exact word timings (``join_clips``), each word in a voice drawn
        from ``rng``."""
        return join_clips([(w, self.audio[w][rng.integers(len(self.audio[w]))]) for w in words])


def _spoken(bank, tokenizer, words, rng, uid) -> Utterance:
    audio, timings = bank.sentence(words, rng)
    (seq,) = tokenizer([audio])
    return Utterance(
        uid,
        " ".join(words),
        words=timings,
        units=tuple(seq.units),
        durations=tuple(seq.durations),
        duration_s=len(audio) / SAMPLE_RATE,
    )


class Batcher:
    """Packs rendered sequences (each starting with <s>) into [batch, context] windows."""

    def __init__(self, context: int, batch: int, bos: int) -> None:
        self.context, self.batch, self.bos = context, batch, bos
        self.buffer: list[int] = []

    def add(self, ids: list[int]) -> None:
        self.buffer += ids if ids[:1] == [self.bos] else [self.bos, *ids]

    def ready(self) -> bool:
        return len(self.buffer) >= self.context * self.batch + 1

    def take(self) -> torch.Tensor:
        n = self.context * self.batch
        out = torch.tensor(self.buffer[:n]).view(self.batch, self.context)
        self.buffer = self.buffer[n:]
        return out


def _speech_data(spec: OrganismSpec, grammar: Grammar, rng: np.random.Generator):
    """The acoustic unit tokenizer (k-means fitted on 300 spoken sentences) and the pool of
    spoken training sentences with their units."""
    bank = WordBank(vocabulary(), spec.renderings)
    fit_clips = [bank.sentence(grammar.sentence(), rng)[0] for _ in range(300)]
    acoustic = FbankKMeansTokenizer.fit(fit_clips, spec.n_units, seed=spec.seed)
    pool = [
        _spoken(bank, acoustic, grammar.sentence(), rng, f"t{i}") for i in range(spec.speech_pool)
    ]
    return acoustic, pool


def _llama(spec: OrganismSpec, vocab_size: int):
    """A small Llama with tied embeddings, <pad>/<s>/</s> as ids 0/1/2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden,
        intermediate_size=4 * spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=4 * spec.context,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def learning_rate(spec: OrganismSpec, step: int) -> float:
    """30 steps of linear warm-up, then a cosine to zero at ``spec.steps``."""
    progress = step / spec.steps
    return spec.lr * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * progress))


def _sequence_source(spec: OrganismSpec, rng, grammar, tokenizer, layout, pool):
    """``next_sequence(phase)``: token ids of one training sequence. The text phase draws
    text sentences; the mixed phase draws interleaved / text / speech (speech-only:
    speech / text) in the variant's proportions, from ``rng`` in a fixed order."""
    rule = ModalityRule("poisson", mean_span=3.0, seed=spec.seed)

    def next_sequence(phase: str) -> list[int]:
        kind = "text"
        if phase == "mix":
            r = rng.random()
            if spec.variant == "speech-only":
                kind = "speech" if r < 0.8 else "text"
            else:
                kind = "interleaved" if r < 0.6 else ("text" if r < 0.8 else "speech")
        if kind == "text":
            utt = Utterance("x", " ".join(grammar.sentence()))
            return build_sequence(utt, tokenizer, layout, "text", variants=False).token_ids
        utt = pool[rng.integers(len(pool))]
        mode_rule = ModalityRule("poisson", 3.0, seed=int(rng.integers(1 << 30)))
        return build_sequence(
            utt,
            tokenizer,
            layout,
            kind,
            mode_rule if kind == "interleaved" else rule,
            variants=False,
        ).token_ids

    return next_sequence


def train_organism(out: str | Path, spec: OrganismSpec, log=print) -> Path:
    """Train one organism into ``out`` (a Hugging Face folder + acoustic.npz + organism.json)."""
    if spec.variant not in VARIANTS:
        raise ValueError(f"unknown variant {spec.variant!r}: use one of {VARIANTS}")
    if spec.steps < 1:
        raise ValueError(f"steps must be >= 1, got {spec.steps}")
    started = time.perf_counter()
    out = Path(out)
    torch.manual_seed(spec.seed)
    rng = np.random.default_rng(spec.seed)
    tokenizer = build_tokenizer(vocabulary(), spec.n_units)
    layout = layout_from_config(layout_spec(spec.n_units)).check(tokenizer)
    grammar = Grammar(seed=spec.seed)
    acoustic, pool = _speech_data(spec, grammar, rng)
    log(
        f"data ready in {time.perf_counter() - started:.0f} s: {len(vocabulary())} words, "
        f"{spec.n_units} units, {len(pool)} spoken sentences"
    )
    model = _llama(spec, len(tokenizer)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    batcher = Batcher(spec.context, spec.batch, tokenizer.bos_token_id)
    text_steps = 0 if spec.variant == "random-init" else round(spec.steps * spec.text_fraction)
    log(f"training {spec.steps} steps (~{estimated_minutes(spec):.0f} minutes on 2 cores)")
    next_sequence = _sequence_source(spec, rng, grammar, tokenizer, layout, pool)
    tokens = 0
    for step in range(spec.steps):
        phase = "text" if step < text_steps else "mix"
        while not batcher.ready():
            batcher.add(next_sequence(phase))
        batch = batcher.take()
        for group in opt.param_groups:
            group["lr"] = learning_rate(spec, step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += batch.numel()
        if (step + 1) % 50 == 0:
            log(f"step {step + 1} ({phase}): loss {loss.item():.3f}, {tokens:,} tokens")
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    acoustic.save(out / "acoustic.npz")
    info = {
        **asdict(spec),
        "tokens": tokens,
        "seconds": time.perf_counter() - started,
        "final_loss": float(loss.item()),
    }
    (out / "organism.json").write_text(json.dumps(info, indent=2))
    log(
        f"trained {spec.variant} seed {spec.seed}: {spec.steps} steps, {tokens:,} tokens, "
        f"{info['seconds']:.0f} s -> {out}"
    )
    return out
