"""What the soak's clients send and what they must get back.

The served models (:class:`Served`, asked of the server), the input pools (:class:`Pools`: captions,
over-long and unicode texts, real photos, token-id rows, and rows that must fail), the reference
embedding of every pool row, computed before the run, and :func:`check_rows`, the check of one answer:
one output row per input row, in order; errors exactly on the bad rows; every good row's embedding within
``TOLERANCE`` (max abs) of the reference for that exact input, so a row mixed up with another client's in
the server's shared batches is caught.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.soak")

TOLERANCE = 1e-3  # max abs difference to the reference embedding of the same input (fp32: ~1e-6 measured)
CLIP_START, CLIP_END = 49406, 49407  # CLIP pools at its end-of-text id: a row without one is a row error

_WORDS = ("a dog sitting on a sunny beach", "two cats looking at a rainy window", "an old man walking through a "
          "busy street", "a red car parked beside a brick wall", "a cup of coffee on the kitchen counter",
          "three horses running across a field of flowers", "the city skyline in the evening light",
          "a small boat floating near the edge of a lake", "a rocket on the launch pad", "a plate of pasta")
_UNICODE = ("Ein Hund läuft über die Straße", "東京の夜景と雨の街", "un café con leche ☕ y churros",
            "Кошка спит на подоконнике", "🚀🌕 to the moon", "مدينة قديمة عند الغروب", "naïve façade — “quoted”")


@dataclass
class Served:
    """What the clients need to know about the served models."""

    text: list[str]               # models that take texts and token ids
    image: list[str]              # models that take images
    dims: dict[str, int]
    max_tokens: dict[str, int]
    max_batch_rows: int
    text_only: list[str]          # text models without images (for the wrong-modality request)
    clip: set[str]                # CLIP models: their token rows need start and end-of-text ids


@dataclass
class Pools:
    """Inputs the clients draw from, with reference embeddings per (kind, model) computed before the run."""

    texts: list[str]
    images: list[bytes]
    tokens: dict[str, list[list[int]]]  # per model: rows that fit its positions
    bad_images: list[bytes | None]
    image_folder: str | None = None    # the photos' folder (the disconnect role's child reads it)
    refs: dict[tuple[str, str], Any] = field(default_factory=dict)


def discover(location: str) -> Served:
    """The models and the batch row limit of the server at ``location``."""
    from flight_client import EmbeddingClient

    with EmbeddingClient(location) as client:
        models = client.models()
        limits = client.limits()
    text = [m["name"] for m in models if "text" in m["modalities"]]
    image = [m["name"] for m in models if "image" in m["modalities"]]
    if not text:
        raise SystemExit(f"{location} serves no text model ({[m['name'] for m in models]}); the soak needs one")
    if not image:
        log.warning("%s serves no image model: the image roles send texts instead", location)
    return Served(text=text, image=image, dims={m["name"]: int(m["dimension"]) for m in models},
                  max_tokens={m["name"]: int(m["max_tokens"] or 0) for m in models},
                  max_batch_rows=int(limits["max_batch_rows"]),
                  text_only=[m["name"] for m in models if "image" not in m["modalities"] and "text" in m["modalities"]],
                  clip={m["name"] for m in models if m.get("kind") == "clip"})


def make_pools(location: str, served: Served, seed: int) -> Pools:
    """The inputs and, from one request per pool, the reference embedding of every pool row."""
    rng = random.Random(seed)
    folder = make_images(32) if served.image else None
    images = [p.read_bytes() for p in sorted(folder.iterdir())] if folder else []
    if served.max_batch_rows < 2:
        raise SystemExit("the server's max_batch_rows is below 2; the soak sends batches of up to 64 rows")
    pools = Pools(texts=make_texts(rng), images=images,
                  tokens={m: make_tokens(rng, served.max_tokens[m], m in served.clip) for m in served.text},
                  bad_images=make_bad_images(images, rng) if images else [], image_folder=folder and str(folder))
    _add_references(location, served, pools)
    return pools


def _add_references(location: str, served: Served, pools: Pools) -> None:
    import numpy as np

    from flight_client import EmbeddingClient

    with EmbeddingClient(location, batch_rows=min(64, served.max_batch_rows)) as client:
        for model in served.text:
            pools.refs[("text", model)] = np.array(client.embed_texts(pools.texts, model=model))
            pools.refs[("tokens", model)] = np.array(client.embed_tokens(pools.tokens[model], model=model))
        for model in served.image:
            pools.refs[("image", model)] = np.array(client.embed_images(pools.images, model=model))


def make_texts(rng: random.Random, n: int = 240) -> list[str]:
    """Captions of 1-40 words, a few over-long texts (2k-40k characters), unicode, empty strings."""
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.06:
            out.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(50, 1000))))  # over-long: truncated
        elif r < 0.12:
            out.append(rng.choice(_UNICODE))
        elif r < 0.14:
            out.append("")
        else:
            words = " ".join(rng.choice(_WORDS) for _ in range(6)).split()
            out.append(" ".join(words[: rng.randint(1, 40)]))
    return out


def make_images(count: int) -> Path:
    """A folder of ``count`` real photos (256-2048 px, mostly JPEG, some PNG/WebP/greyscale): bench.data's
    image set, cut from tests/data/photos and cached in bench/.cache."""
    from bench.data import make_image_set

    return make_image_set(count)


def make_bad_images(images: list[bytes], rng: random.Random) -> list[bytes | None]:
    """Rows that must fail: truncated at 20-90 % (JPEG, PNG, WebP), empty, not an image, null."""
    bad: list[bytes | None] = [None, b"", b"this is not an image" * 20, bytes(rng.getrandbits(8) for _ in range(3000))]
    for b in images[:12]:
        bad.append(b[: int(len(b) * rng.uniform(0.2, 0.9))])
    return bad


def make_tokens(rng: random.Random, max_tokens: int, clip: bool, n: int = 120) -> list[list[int]]:
    """Token-id rows of 1..max_tokens ids in [1000, 20000) (inside every served vocabulary, never a pad id);
    for CLIP, between its start and end-of-text ids."""
    lengths = [rng.randint(1, 24) if r < 0.6 else rng.randint(25, 128) if r < 0.95 else rng.randint(1, max_tokens)
               for r in (rng.random() for _ in range(n))]
    rows = [[rng.randrange(1000, 20000) for _ in range(k)] for k in lengths]
    if clip:
        rows = [[CLIP_START, *r[: max(0, max_tokens - 2)], CLIP_END] for r in rows]
    return rows


def bad_token_rows(rng: random.Random, max_tokens: int) -> list[list[int] | None]:
    """Token rows that must fail: null, empty, out of the vocabulary, negative, longer than the model."""
    return [None, [], [10 ** 6], [rng.randrange(1000, 20000), -5],
            [rng.randrange(1000, 20000) for _ in range(max_tokens + rng.randint(1, 40))]]


def draw_texts(rng: random.Random, pools: Pools, n: int, null_share: float = 0.06) -> tuple[list, list]:
    """``n`` text rows from the pool (null with ``null_share``) and, per row, its pool index or None (must fail)."""
    rows, expected = [], []
    for _ in range(n):
        if rng.random() < null_share:
            rows.append(None)
            expected.append(None)
        else:
            k = rng.randrange(len(pools.texts))
            rows.append(pools.texts[k])
            expected.append(k)
    return rows, expected


def draw_images(rng: random.Random, pools: Pools, n: int, bad_share: float = 0.15) -> tuple[list, list]:
    """``n`` image rows (a bad one with ``bad_share``) and, per row, its pool index or None (must fail)."""
    rows, expected = [], []
    for _ in range(n):
        if rng.random() < bad_share:
            rows.append(rng.choice(pools.bad_images))
            expected.append(None)
        else:
            k = rng.randrange(len(pools.images))
            rows.append(pools.images[k])
            expected.append(k)
    return rows, expected


def draw_tokens(rng: random.Random, pools: Pools, served: Served, model: str, n: int) -> tuple[list, list]:
    """``n`` token rows for ``model`` (10 % bad) and, per row, its pool index or None (must fail)."""
    pool = pools.tokens[model]
    rows, expected = [], []
    for _ in range(n):
        if rng.random() < 0.1:
            rows.append(rng.choice(bad_token_rows(rng, served.max_tokens[model])))
            expected.append(None)
        else:
            k = rng.randrange(len(pool))
            rows.append(pool[k])
            expected.append(k)
    return rows, expected


class Unexpected(Exception):
    """An answer that is not what the protocol promises for this request."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def check_rows(pools: Pools, served: Served, kind: str, model: str, emb, errors: list, expected: list) -> None:
    """``expected[i]``: the pool index of a good row, or None for a row that must fail."""
    import numpy as np

    n = len(expected)
    if emb.shape != (n, served.dims[model]) or len(errors) != n:
        raise Unexpected("wrong shape", f"{kind}/{model}: sent {n} rows, got embeddings {emb.shape} and "
                                        f"{len(errors)} errors")
    for i, exp in enumerate(expected):
        if exp is None and errors[i] is None:
            raise Unexpected("missing row error", f"{kind}/{model} row {i}: a bad row came back embedded")
        if exp is not None and errors[i] is not None:
            raise Unexpected("unexpected row error", f"{kind}/{model} row {i}: {errors[i]}")
    good = [i for i, e in enumerate(expected) if e is not None]
    if not good:
        return
    got = emb[good]
    ref = pools.refs[(kind, model)][[expected[i] for i in good]]
    diff = float(np.abs(got - ref).max())
    if not np.isfinite(got).all() or diff > TOLERANCE:
        worst = good[int(np.abs(got - ref).max(axis=1).argmax())]
        raise Unexpected("wrong embedding", f"{kind}/{model} row {worst} of {n}: max abs diff {diff:.3g} "
                                            f"to the reference of its input (tolerance {TOLERANCE})")
