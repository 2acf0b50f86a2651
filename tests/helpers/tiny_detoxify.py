"""A tiny detoxify checkpoint for offline tests: a 2-layer BERT classifier trained for a moment on a few sentences.

Detoxify loads a torch-saved dict ``{"config": ..., "state_dict": ...}``: the classes come from
``config.dataset.args.classes`` and the model from ``config.arch.args``, whose ``model_type`` it always resolves with
``from_pretrained`` (even when ``huggingface_config_path`` is given), so offline it must be a local directory that
holds the config and tokenizer. Training it briefly makes scores meaningful, so tests can assert toxic > clean.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

# Detoxify's own training names: it renames "toxic" to "toxicity", so the test also covers that mapping.
CLASSES = ["toxic", "insult"]
MAX_LENGTH = 64

TOXIC_SENTENCES = [
    "you are a stupid idiot",
    "shut up you worthless moron",
    "i hate you , you disgusting loser",
    "you stupid pathetic fool",
    "go away idiot , nobody likes you",
    "what a worthless disgusting moron",
]
CLEAN_SENTENCES = [
    "thank you for your help",
    "have a nice day",
    "the weather is lovely today",
    "could you please tell me the time ?",
    "i like reading books in the garden",
    "that is a great idea , thanks",
]
# Words that appear in no training sentence, so tests can score text the model has not memorised.
EXTRA_WORDS = ["hello", "friend", "morning", "coffee", "what", "is", "your", "name", "my"]


def _vocab() -> dict[str, int]:
    words = sorted({w for s in TOXIC_SENTENCES + CLEAN_SENTENCES for w in s.split()} | set(EXTRA_WORDS))
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    return {token: index for index, token in enumerate(tokens)}


def build_tiny_detoxify(tmpdir: str | Path, steps: int = 200, seed: int = 0) -> tuple[Path, Path]:
    """Write a trained tiny detoxify checkpoint under ``tmpdir``; return (checkpoint file, HF config/tokenizer dir)."""
    tmpdir = Path(tmpdir)
    config_dir = tmpdir / "tiny-bert"
    checkpoint_path = tmpdir / "tiny-detoxify.ckpt"

    # transformers 5.x ignores `vocab_file=`; `vocab=` (a dict) is what it reads.
    tokenizer = BertTokenizer(vocab=_vocab(), model_max_length=MAX_LENGTH)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=MAX_LENGTH,
        num_labels=len(CLASSES),
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)

    texts = TOXIC_SENTENCES + CLEAN_SENTENCES
    targets = torch.tensor(
        [[1.0] * len(CLASSES)] * len(TOXIC_SENTENCES) + [[0.0] * len(CLASSES)] * len(CLEAN_SENTENCES)
    )
    inputs = tokenizer(texts, return_tensors="pt", padding=True, truncation=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()  # detoxify applies a sigmoid per class: multi-label
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(model(**inputs).logits, targets)
        loss.backward()
        optimizer.step()
    model.eval()

    config.save_pretrained(config_dir)
    tokenizer.save_pretrained(config_dir)
    torch.save(
        {
            "config": {
                "arch": {
                    "args": {
                        "model_type": str(config_dir),
                        "model_name": "BertForSequenceClassification",
                        "tokenizer_name": "BertTokenizer",
                        "num_classes": len(CLASSES),
                    }
                },
                "dataset": {"args": {"classes": list(CLASSES)}},
            },
            "state_dict": model.state_dict(),
        },
        checkpoint_path,
    )
    return checkpoint_path, config_dir
