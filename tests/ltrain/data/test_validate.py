import pytest
from omegaconf import OmegaConf

from ltrain.data.config import DataConfig, DataConfigError
from ltrain.data.validate import validate_data_config


def test_defaults_validate_and_work_as_structured_config():
    validate_data_config(DataConfig())
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), {"task": "recall", "seq_len": 512})
    validate_data_config(OmegaConf.to_object(cfg))
    validate_data_config(cfg)  # a DictConfig works too


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"kind": "hdf5"}, "data.kind='hdf5' is not one of synthetic, memmap"),
        ({"task": "sorting"}, "data.task='sorting' is not one of passkey, recall, mixed"),
        ({"seq_len": 0}, "data.seq_len=0 must be a positive integer"),
        ({"seq_len": 12.5}, "data.seq_len=12.5"),
        ({"micro_batch_size": -1}, "data.micro_batch_size=-1"),
        ({"passkey_digits": 0}, "data.passkey_digits=0"),
        ({"depth_min": 0.8, "depth_max": 0.2}, "data.depth_min=0.8"),
        ({"recall_pairs": -2}, "data.recall_pairs=-2"),
        ({"task": "recall", "recall_key_len": 1, "recall_pairs": 30, "seq_len": 4096}, "data.recall_pairs=30 exceeds the 26"),
        ({"seq_len": 64}, "data.seq_len=64 is too short for data.task=passkey (needs >= 101)"),
        ({"task": "recall", "recall_pairs": 50}, "data.seq_len=256 is too short for data.task=recall"),
        ({"kind": "memmap"}, "data.path is not set"),
    ],
)
def test_bad_values_name_the_key(kwargs, needle):
    with pytest.raises(DataConfigError) as e:
        validate_data_config(DataConfig(**kwargs))
    msg = str(e.value)
    assert needle in msg and "\n" not in msg
