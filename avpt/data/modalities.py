"""The data sets and modalities the library knows, stated once (the CLI's choices, the checks of
``avpt.validate`` and the loaders read them from here). A leaf module: no imports."""

MODALITIES = ("MG", "US", "MRI")                  # mammography, ultrasound, breast MRI
DATASETS = ("phantom", "busi", "inbreast", "duke")
DATASET_MODALITY = {"busi": "US", "inbreast": "MG", "duke": "MRI"}  # the real data sets' one modality
