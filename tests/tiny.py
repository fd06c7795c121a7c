"""Tiny random encoders built from configs, saved with a real WordPiece tokenizer: no downloads."""
from __future__ import annotations

from pathlib import Path

import torch

WORDS = (
    "the a an is was good bad great awful movie film plot actor love hate fun boring what who where when how "
    "why which free win prize call now text me you i it this that not very really and or but of to in on for "
    "with spam ham question answer city name year day night money cash reply stop ok yes no"
).split()


def make_tokenizer():
    """A BERT-style WordPiece tokenizer over a small vocabulary, built with `tokenizers` alone."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = specials + letters + [f"##{c}" for c in letters] + list(".,!?'-0123456789") + WORDS
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab))}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=64,
    )


def make_tiny(kind: str, directory: Path, seed: int = 0) -> Path:
    """Save a tiny random `kind` encoder (bert, roberta, distilbert, mpnet, electra) + tokenizer to directory."""
    import transformers as T

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    size = len(tokenizer)
    common = dict(vocab_size=size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=37, max_position_embeddings=72, pad_token_id=0)
    torch.manual_seed(seed)
    if kind == "bert":
        model = T.BertModel(T.BertConfig(**common))
    elif kind == "roberta":
        model = T.RobertaModel(T.RobertaConfig(**common, type_vocab_size=1))
    elif kind == "electra":
        model = T.ElectraModel(T.ElectraConfig(**common, embedding_size=16))
    elif kind == "mpnet":
        model = T.MPNetModel(T.MPNetConfig(**common))
    elif kind == "distilbert":
        model = T.DistilBertModel(T.DistilBertConfig(vocab_size=size, dim=32, n_layers=2, n_heads=2, hidden_dim=37,
                                                     max_position_embeddings=72, pad_token_id=0))
    else:
        raise ValueError(kind)
    # Fresh HF models have all-zero biases; real ones do not. Random biases make the parity tests mean something.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
