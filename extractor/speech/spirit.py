"""Spirit LM's speech tokenizer as released: HuBERT features, a linear quantizer, CTC blanks.

Matches ``facebookresearch/spiritlm`` (``speech_tokenizer/hubert/quantizer_model.py`` and
``hubert_tokenizer.py``) step for step:

- the waveform, averaged over channels, is layer-normalised whole when the HuBERT task
  says ``normalize`` (``do_normalize`` in the converted folder's preprocessor config);
- features come from 100-second chunks of the unpadded waveform (a tail shorter than 400
  samples is skipped), HuBERT's output at ``layer``, one utterance at a time;
- the quantizer is three linear layers with LeakyReLU between them; its last layer has
  ``vocab_size + 1`` outputs, the extra one a CTC blank; a frame's unit is the argmax of
  the log-softmax;
- every blank frame takes the unit of the nearest non-blank frame to its left, wrapping
  around to the end of the utterance for leading blanks (the release's ``torch.roll``),
  at most 10,000 frames away.

The checkpoint loads with ``torch.load(weights_only=True)``: no code from it runs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .audio import SAMPLE_RATE
from .units import UnitSequence, check_head, dedup

#: The release's chunking of long audio (samples at 16 kHz).
MIN_CHUNK = 400
MAX_CHUNK = 100 * SAMPLE_RATE
#: The release stops filling blanks after this many passes (one frame per pass).
MAX_BLANK_FILL = 10_000


class QuantizerFormatError(ValueError):
    """A quantizer checkpoint that is not in the released format; says what is wrong."""


def fill_blanks(codes: np.ndarray, blank: int) -> np.ndarray:
    """Each ``blank`` takes the nearest non-blank code to its left, cyclically (the release)."""
    codes = np.asarray(codes)
    keep = codes != blank
    if keep.all() or not keep.any():
        return codes.copy()
    n = len(codes)
    positions = np.arange(n)
    source = np.maximum.accumulate(np.where(keep, positions, -1))
    wrapped = source < 0  # leading blanks: torch.roll brings in the utterance's end
    source[wrapped] = np.flatnonzero(keep)[-1]
    distance = np.where(wrapped, positions + n - source, positions - source)
    out = codes[source]
    out[distance > MAX_BLANK_FILL] = blank
    return out


class SpiritQuantizer:
    """The released ``LinearQuantizerModel``: checkpoint format, layer widths, forward."""

    def __init__(self, checkpoint: dict, device: str = "cpu") -> None:
        import torch

        try:
            cfg = checkpoint["model_cfg"]
            weights = checkpoint["model_weight"]
            self.vocab_size = int(cfg["vocab_size"])
            dim, upstream = int(cfg["dim"]), int(cfg["upstream_dim"])
        except (KeyError, TypeError, ValueError) as exc:
            raise QuantizerFormatError(
                "not a Spirit LM quantizer checkpoint: expected {'model_cfg': {vocab_size, dim, "
                f"upstream_dim}}, 'model_weight': {{...}}}}, missing {exc}"
            ) from exc
        mid = upstream - (self.vocab_size + 1)
        widths = [dim, dim - mid // 4, dim - mid // 2, self.vocab_size + 1]
        self.layers = []
        for i, key in enumerate(("0", "2", "4")):
            want = (widths[i + 1], widths[i])
            w, b = weights.get(f"{key}.weight"), weights.get(f"{key}.bias")
            if w is None or b is None or tuple(w.shape) != want or tuple(b.shape) != want[:1]:
                raise QuantizerFormatError(
                    f"quantizer layer {key}: expected weight {want} and bias {want[:1]}, got "
                    f"{None if w is None else tuple(w.shape)} and "
                    f"{None if b is None else tuple(b.shape)}"
                )
            self.layers.append((w.float().to(device), b.float().to(device)))
        self.dim = dim
        self._torch = torch

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> SpiritQuantizer:
        import torch

        return cls(torch.load(path, map_location="cpu", weights_only=True), device)

    def codes(self, features) -> np.ndarray:
        """Units per frame of ``features`` [T, dim], blanks filled."""
        F = self._torch.nn.functional
        h = features.float()
        for j, (w, b) in enumerate(self.layers):
            h = F.linear(h, w, b)
            if j < len(self.layers) - 1:
                h = F.leaky_relu(h)
        code = F.log_softmax(h, dim=-1).argmax(dim=-1).cpu().numpy()
        return fill_blanks(code, self.vocab_size)


def reads_normalized(folder: str | Path) -> bool:
    """Whether the HuBERT folder's task normalises the waveform (``do_normalize``)."""
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        return False
    return bool(json.loads(path.read_text()).get("do_normalize", False))


class LinearQuantizerTokenizer:
    """HuBERT (transformers ``HubertModel``) + :class:`SpiritQuantizer`, as Spirit LM tokenises."""

    def __init__(
        self,
        model,
        quantizer: SpiritQuantizer,
        layer: int = 11,
        device: str = "cpu",
        normalize: bool = False,
    ) -> None:
        self.model = model.to(device).eval()
        self.quantizer = quantizer
        self.layer = layer
        self.device = device
        self.normalize = normalize
        check_head(model, layer, quantizer.dim, "quantizer input", QuantizerFormatError)
        if model.config.do_stable_layer_norm and layer == model.config.num_hidden_layers:
            # transformers applies the encoder's final norm to its last hidden state;
            # fairseq's extract_features(output_layer=L) does not.
            raise ValueError(
                f"layer {layer} is a pre-LN HuBERT's last: transformers normalises it, the "
                "release does not; use an earlier layer"
            )

    @classmethod
    def from_file(cls, model, path: str | Path, **kwargs) -> LinearQuantizerTokenizer:
        device = kwargs.get("device", "cpu")
        return cls(model, SpiritQuantizer.load(path, device), **kwargs)

    def n_frames(self, n_samples: int) -> int:
        import torch

        frames = 0
        for start in range(0, n_samples, MAX_CHUNK):
            size = min(MAX_CHUNK, n_samples - start)
            if size >= MIN_CHUNK:
                frames += int(self.model._get_feat_extract_output_lengths(torch.tensor(size)))
        return frames

    def features(self, audio: np.ndarray):
        """HuBERT's ``layer`` output over the release's chunks: [T, hidden]."""
        import torch

        x = torch.from_numpy(np.asarray(audio, dtype=np.float32)).to(self.device)
        if self.normalize:
            x = torch.nn.functional.layer_norm(x, x.shape)
        parts = []
        with torch.no_grad():
            for start in range(0, x.shape[0], MAX_CHUNK):
                chunk = x[start : start + MAX_CHUNK]
                if chunk.shape[0] < MIN_CHUNK:
                    continue
                out = self.model(chunk[None], output_hidden_states=True)
                parts.append(out.hidden_states[self.layer][0])
        if not parts:
            return torch.zeros(0, self.model.config.hidden_size, device=self.device)
        return torch.cat(parts)

    def __call__(self, batch: Sequence[np.ndarray]) -> list[UnitSequence]:
        """One utterance at a time, as the release runs: units never depend on the batch."""
        out = []
        for audio in batch:
            codes = self.quantizer.codes(self.features(audio))
            n_frames = len(codes)
            if n_frames and (codes == self.quantizer.vocab_size).all():
                codes = codes[:0]  # all blank: the release would emit an out-of-vocabulary unit
            units, durations = dedup(codes.tolist())
            out.append(UnitSequence(units, durations, n_frames))
        return out
