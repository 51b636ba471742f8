"""The data sets and modalities the library knows, stated once (the CLI's choices, the checks of
``avpt.validate`` and the loaders read them from here). A leaf module: no imports."""
from typing import Optional, Sequence


MODALITIES = ("MG", "US", "MRI")                  # mammography, ultrasound, breast MRI
DATASETS = ("phantom", "busi", "inbreast", "duke")
DATASET_MODALITY = {"busi": "US", "inbreast": "MG", "duke": "MRI"}  # the real data sets' one modality
# the word text prompts use for each modality (BiomedAP's "a {modality} photo of a ...")
MODALITY_WORDS = {"MG": "mammography", "US": "ultrasound", "MRI": "MRI"}
GENERIC_MODALITY_WORD = "medical"


def modality_word(dataset: str, modalities: Optional[Sequence[str]]) -> str:
    """The prompt word for a run's data: the data set's one modality (BUSI: "ultrasound"), the
    phantom's single selected modality, or "medical" when the images mix modalities (a class
    prompt is shared by every image)."""
    chosen = [DATASET_MODALITY[dataset]] if dataset in DATASET_MODALITY \
        else list(modalities or MODALITIES)
    words = {MODALITY_WORDS[m] for m in chosen}
    return words.pop() if len(words) == 1 else GENERIC_MODALITY_WORD
