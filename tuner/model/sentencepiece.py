"""A tokenizer that transformers built from a SentencePiece model file (a folder with tokenizer.model and no
tokenizer.json), made to split text as SentencePiece itself does.

transformers 5 turns a SentencePiece BPE model into merges ordered by piece id, where SentencePiece merges
by piece score. The two orders agree except where a model gives pieces low scores on purpose: Mistral's
models (v1, v2, v3, v7) put the whitespace runs '▁▁', '▁▁▁', ... at low ids with score -1e9, so transformers
merges them first: 'x.  Hi' became '▁x' '.' '▁▁' 'Hi' where SentencePiece (and mistral-common, and the model
in training) gives '▁x' '.' '▁' '▁Hi'. transformers 4 passed the scores (PR #22582); 5 dropped them.
"""

from __future__ import annotations

import json
from pathlib import Path

BPE = 2  # sentencepiece's TrainerSpec.ModelType


def converted_model_file(tokenizer) -> Path | None:
    """The tokenizer.model this tokenizer was built from, when transformers built it (no tokenizer.json)."""
    kwargs = getattr(tokenizer, "init_kwargs", {}) or {}
    vocab_file = kwargs.get("vocab_file")
    if not vocab_file or kwargs.get("tokenizer_file") or not str(vocab_file).endswith(".model"):
        return None
    path = Path(vocab_file)
    if not path.is_file() or (path.parent / "tokenizer.json").exists():
        return None
    return path


def read_model(model_file: Path):
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    return proto


def merge_by_scores(tokenizer) -> bool:
    """Rebuild the merges of a tokenizer transformers converted from a SentencePiece BPE model in score
    order (SentencePiece's); True when they were rebuilt. About 0.5 s for a 32k vocabulary, once per load."""
    model_file = converted_model_file(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if model_file is None or backend is None:
        return False
    proto = read_model(model_file)
    if proto.trainer_spec.model_type != BPE:
        return False
    state = json.loads(backend.to_str())
    if state.get("model", {}).get("type") != "BPE":
        return False
    from tokenizers import Tokenizer
    from transformers.tokenization_utils_base import generate_merges

    scores = {piece.piece: piece.score for piece in proto.pieces}
    vocab = state["model"]["vocab"]
    merges = generate_merges(vocab, {token: scores.get(token, 0.0) for token in vocab})
    state["model"]["merges"] = [list(merge) for merge in merges]
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))
    return True
