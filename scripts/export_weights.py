"""Write the weights of a checkpoint for the model zoo: fp32 tensors under the authors' key names, no
optimizer, RNG or history, so that a ResNet-32 fits in about 1.9 MB and `eval.py` reproduces its figures.

    python -m scripts.export_weights saved/<run>/ckps/model_best.pth.tar results/<table>/weights/<name>.pth.tar

`--half` stores the floating-point tensors in fp16, half the size, for the larger models (RIDE's and
ResLT's three experts); loading casts them back to the model's fp32, so the rounding is the only change,
and the `eval.json` beside such a file is measured on it.

The file holds `state_dict_model`, `state_dict_classifier`, `epoch`, `best_acc1` and `its_ece`: the
authors' checkpoint keys and parameter names, without the `module.` prefix their DataParallel models
add (this project's `resume` and `eval.py` read it; their scripts need the prefix put back).
`.gitignore` lets `results/*/weights/*.pth.tar` be committed; nothing else of `*.pth.tar`.
"""
import argparse
import os

import torch

from common.checkpoint import load_checkpoint, save_checkpoint
from common.errors import UserError
from utils.setup import run_cli


def weights_only(ckpt, dtype=torch.float32):
    def cast(state):
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return {'epoch': int(ckpt.get('epoch', 0)), 'state_dict_model': cast(ckpt['state_dict_model']),
            'state_dict_classifier': cast(ckpt['state_dict_classifier']),
            'best_acc1': float(ckpt.get('best_acc1', float('nan'))),
            'its_ece': float(ckpt.get('its_ece', float('nan')))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('checkpoint')
    parser.add_argument('out')
    parser.add_argument('--half', action='store_true', help='store floating-point tensors in fp16 (half the size)')
    args = parser.parse_args(argv)
    ckpt = load_checkpoint(args.checkpoint)
    if os.path.abspath(args.out) == os.path.abspath(args.checkpoint):
        raise UserError(f'{args.out} is the checkpoint itself; give another output path')
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_checkpoint(weights_only(ckpt, torch.float16 if args.half else torch.float32), args.out)
    print(f'wrote {args.out}: epoch {ckpt.get("epoch")}, {os.path.getsize(args.out) / 2 ** 20:.2f} MiB')


if __name__ == '__main__':
    run_cli(main)
