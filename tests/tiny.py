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
    """Save a tiny random `kind` encoder + tokenizer to directory: bert, roberta, xlm-roberta, distilbert, mpnet,
    electra, albert, deberta-v2; "modernbert" is a bias-free encoder, for the refusal tests.

    Every kind gets the same WordPiece tokenizer. Real ALBERT, XLM-R and DeBERTa-v2 ship SentencePiece
    (Unigram) tokenizers, but the runtime and training only need a fast tokenizer's tokenizer.json, so which
    tokenizer model it holds does not matter to what these tests check.
    """
    import transformers as T

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    size = len(tokenizer)
    common = dict(vocab_size=size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=37, max_position_embeddings=72, pad_token_id=0)
    # At the default initializer_range 0.02 a 32-wide model attends almost uniformly, so a query bias moves
    # ELECTRA's or ALBERT's output by ~1e-5 and liveness checks cannot see it; 0.1 gives real models' contrast.
    contrast = dict(initializer_range=0.1)
    torch.manual_seed(seed)
    if kind == "bert":
        model = T.BertModel(T.BertConfig(**common))
    elif kind == "roberta":
        model = T.RobertaModel(T.RobertaConfig(**common, type_vocab_size=1))
    elif kind == "xlm-roberta":
        model = T.XLMRobertaModel(T.XLMRobertaConfig(**common, **contrast, type_vocab_size=1))
    elif kind == "electra":
        model = T.ElectraModel(T.ElectraConfig(**common, **contrast, embedding_size=16))
    elif kind == "albert":
        # One layer group shared by both depths, as in the released ALBERTs (num_hidden_groups=1).
        model = T.AlbertModel(T.AlbertConfig(**common, **contrast, embedding_size=16, num_hidden_groups=1,
                                             inner_group_num=1))
    elif kind == "deberta-v2":
        # DeBERTa-v3's setup (relative attention with log buckets, no absolute positions, no token types),
        # with 16 buckets so sequences past 8 tokens take the log-bucket path.
        model = T.DebertaV2Model(T.DebertaV2Config(
            **common, **contrast, type_vocab_size=0, relative_attention=True, position_biased_input=False,
            pos_att_type=["p2c", "c2p"], max_relative_positions=-1, position_buckets=16, norm_rel_ebd="layer_norm",
            share_att_key=True, hidden_act="gelu"))
    elif kind == "modernbert":
        model = T.ModernBertModel(T.ModernBertConfig(
            **common, cls_token_id=2, sep_token_id=3, bos_token_id=2, eos_token_id=3))
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
