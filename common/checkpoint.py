"""Checkpoints: written atomically, read without executing pickled code, checked against the model."""
import os
import pickle
import zipfile

import numpy as np
import torch

from .errors import UserError

# numpy scalars some released checkpoints carry (e.g. `its_ece`); allowed, nothing callable is.
_NUMPY_SAFE = [np.dtype, type(np.dtype('float64')), type(np.dtype('float32'))]
try:
    _NUMPY_SAFE.append(np._core.multiarray.scalar)
except AttributeError:  # numpy < 2
    _NUMPY_SAFE.append(np.core.multiarray.scalar)


def save_checkpoint(state, path):
    """torch.save to a temporary file, then rename: a killed save leaves the old file intact."""
    tmp = f'{path}.tmp'
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, what='checkpoint'):
    """The dict saved by this project or by the authors' code, with `module.` prefixes removed."""
    if not path:
        raise UserError(f'no {what} given; pass one with `resume path/to/model_best.pth.tar`')
    if not os.path.isfile(path):
        raise UserError(f'{what} {path} not found; check the path given to `resume`')
    try:
        with torch.serialization.safe_globals(_NUMPY_SAFE):
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f'{what} {path} holds objects other than tensors and numbers and was not loaded '
                        f'({str(e).splitlines()[-1][:120]}); use a checkpoint saved by this project or the authors')
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise UserError(f'{what} {path} is truncated or corrupt ({type(e).__name__}); use an intact copy')
    if not isinstance(ckpt, dict) or 'state_dict_model' not in ckpt or 'state_dict_classifier' not in ckpt:
        raise UserError(f'{what} {path} lacks state_dict_model/state_dict_classifier; it is not an H2T checkpoint')
    for key in ('state_dict_model', 'state_dict_classifier'):
        ckpt[key] = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in ckpt[key].items()}
    return ckpt


def state_dict_differences(own, state_dict):
    """What keeps `state_dict` from loading into a module whose state_dict is `own`: the missing keys, the
    unexpected keys, and (key, shape there, shape here) for each tensor of another shape."""
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [(k, tuple(state_dict[k].shape), tuple(v.shape)) for k, v in own.items()
             if k in state_dict and state_dict[k].shape != v.shape]
    return missing, unexpected, wrong


def load_weights(module, state_dict, path, part, cfg):
    """load_state_dict with a one-line error when the checkpoint was trained for another config."""
    own = module.state_dict()
    # a stage-1 classifier has no LearnableWeightScaling: stage 2 starts it at 1, the identity
    state_dict = {**{k: v for k, v in own.items() if k.startswith('lws.')}, **state_dict}
    missing, unexpected, wrong = state_dict_differences(own, state_dict)
    if missing or unexpected or wrong:
        if wrong:
            k, theirs, ours = wrong[0]
            detail = f'{k} is {list(theirs)} in the checkpoint but {list(ours)} here'
        else:
            detail = f'{len(missing)} missing and {len(unexpected)} unexpected keys, e.g. {(missing + unexpected)[0]}'
        raise UserError(f'checkpoint {path} does not fit the {part} of this config (backbone {cfg.backbone}, '
                        f'num_classes {cfg.num_classes}, use_norm {cfg.use_norm}): {detail}; use the config it was '
                        f'trained with')
    module.load_state_dict(state_dict)
