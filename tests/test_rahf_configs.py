"""The RAHF configs live in their own modules (``rahf/*_config.py``); the trainer modules, where they used to be,
still export them, so old imports and ``training_args.bin`` pickled before the move keep loading."""

import pickle

import pytest

from hf_repalign import rahf
from hf_repalign.rahf import dual, scit, trainer

MOVED = [  # (class, module it used to live in, module it lives in now)
    ("SCITConfig", "hf_repalign.rahf.scit", "hf_repalign.rahf.scit_config"),
    ("RAHFConfig", "hf_repalign.rahf.trainer", "hf_repalign.rahf.rahf_config"),
    ("DualConfig", "hf_repalign.rahf.dual", "hf_repalign.rahf.dual_config"),
]


def test_old_module_paths_export_the_same_classes():
    assert rahf.SCITConfig is scit.SCITConfig and rahf.RAHFConfig is trainer.RAHFConfig
    assert rahf.DualConfig is dual.DualConfig


@pytest.mark.parametrize("name,old,new", MOVED)
def test_configs_pickled_under_the_old_path_load(name, old, new, tmp_path):
    cls = getattr(rahf, name)
    assert cls.__module__ == new
    args = cls(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    data = pickle.dumps(args, protocol=0)  # protocol 0 is text: the module path can be swapped
    assert f"{new}\n".encode() in data
    loaded = pickle.loads(data.replace(f"{new}\n".encode(), f"{old}\n".encode()))
    assert type(loaded) is cls and loaded.output_dir == str(tmp_path)
