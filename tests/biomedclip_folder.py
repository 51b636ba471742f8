"""A BiomedCLIP-layout open_clip folder for CPU tests: tiny timm ViT trunk (timm's ``test_vit``:
width 64, 6 blocks, 160 px, patch 16), tiny BERT text tower (width 32, 2 layers) with a WordPiece
vocabulary written here, random weights saved as ``open_clip_pytorch_model.bin``. Nothing is
downloaded (BiomedCLIP's own text_cfg names its hub model; the folder's config.json is used)."""
import json
import os
import warnings
from pathlib import Path

import torch

WORDS = ("a photo of the in breast ultrasound mammography mri benign malignant normal tumour "
         "lesion mass tissue image with shows round irregular margin shadow dense fat x h . , "
         "an and is are class medical scan").split()


def make_biomedclip_folder(folder) -> str:
    """Writes the folder (once) and returns ``local-dir:<folder>``."""
    from transformers import BertConfig, BertTokenizer

    folder = Path(folder)
    name = f"local-dir:{folder}"
    if (folder / "open_clip_pytorch_model.bin").is_file():
        return name
    folder.mkdir(parents=True, exist_ok=True)
    hub = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
    config = {"model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False,
                       "timm_pool": "", "timm_proj": "linear", "image_size": 160},
        "text_cfg": {"hf_model_name": hub, "hf_tokenizer_name": hub, "hf_proj_type": "mlp",
                     "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 64}},
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711]}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS,
             *[f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"], *"abcdefghijklmnopqrstuvwxyz"]
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(str(folder))
    BertConfig(vocab_size=len(dict.fromkeys(vocab)), hidden_size=32, num_hidden_layers=2,
               num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
               pad_token_id=0).save_pretrained(str(folder))
    from avpt.backbone import RandomWeightsWarning
    from avpt.local_backbone import create_local_model

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model = create_local_model(name)
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return name
