"""A tiny random causal LM folder for CPU tests (GPT-2 architecture, width 32, 2 layers) with a
word-level tokenizer that prepends a begin-of-sequence token, as LLaMA's does. Nothing is
downloaded."""
from pathlib import Path

import torch

from tests.biomedclip_folder import WORDS


def make_causal_lm_folder(folder) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return str(folder)
    vocab = {w: i for i, w in enumerate(dict.fromkeys(["<unk>", "<s>", "</s>", "<pad>", *WORDS,
                                                       "probably", "suspicious", "bi-rads"]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.save_pretrained(str(folder))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=2,
                                       n_positions=128, bos_token_id=1, eos_token_id=2))
    model.save_pretrained(str(folder))
    return str(folder)
