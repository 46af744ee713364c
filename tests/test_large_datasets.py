"""ImageNet-LT, iNaturalist 2018 and Places-LT from list files, on small generated JPEG folders: the
lists, the renumbering, the samplers, both stages and eval end to end, two processes, resume, and bad input."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import LIST_COUNTS, ROOT, assert_one_line_error, run_main, run_script
from datasets.image_list import GlobalBatchSampler, count_splits
from utils.config import load_config
from common.errors import UserError

IMAGENET1 = 'config/imagenet/imagenet_lt_resnet50_stage1_ce_mixup.yaml'
IMAGENET2 = 'config/imagenet/imagenet_lt_resnet50_stage2_ce_H2T.yaml'
INAT1 = 'config/ina2018/ina2018_resnet50_stage1_ce_mixup.yaml'
INAT2 = 'config/ina2018/ina2018_resnet50_stage2_ce_H2T.yaml'
PLACES1 = 'config/places/places_lt_resnet152_stage1_ce_mixup.yaml'
PLACES2 = 'config/places/places_lt_resnet152_stage2_ce_H2T.yaml'
# resnet10 at 32 px: the shipped configs' data path, scaled down to run in seconds on a CPU
TINY = ['num_classes', str(len(LIST_COUNTS)), 'image_size', '32', 'batch_size', '8', 'eval_batch_size', '4',
        'print_freq', '2', 'num_epochs', '1', 'device', 'cpu', 'precision', 'fp32', 'backbone', 'resnet10_fe']


def inat_json_lists(root):
    """The generated lists as iNaturalist 2018's official JSON files; returns the list overrides."""
    out = []
    for name, key in (('ImageNet_LT_train.txt', 'train_list'), ('ImageNet_LT_test.txt', 'eval_list')):
        entries = [line.split() for line in open(os.path.join(root, name)).read().splitlines()]
        images = [{'id': i, 'file_name': p} for i, (p, _) in enumerate(entries)]
        annotations = [{'id': i, 'image_id': i, 'category_id': int(t)} for i, (_, t) in enumerate(entries)]
        path = os.path.join(root, name.replace('.txt', '.json'))
        json.dump({'images': images, 'annotations': annotations}, open(path, 'w'))
        out += [key, path]
    return out


@pytest.fixture(scope='module')
def places_stage1(imagenet_lt_root, tmp_path_factory):
    """A Places-LT stage 1 (resnet152_places_fe on a generated 'ImageNet-trained' ResNet-152)."""
    from torchvision.models import resnet152
    tmp = tmp_path_factory.mktemp('places')
    torch.manual_seed(0)
    imagenet = resnet152().state_dict()
    torch.save(imagenet, tmp / 'resnet152.pth')
    common = places_args(imagenet_lt_root)
    ok(run_script('train_stage1.py', '--cfg', PLACES1, *common, 'save_dir', str(tmp), 'pretrained',
                  str(tmp / 'resnet152.pth')))
    run, = runs(tmp, 'places_lt_resnet152_stage1_ce_mixup')
    return dict(run=run, imagenet=imagenet, common=common)


def places_args(root):
    return ['data_path', root, 'train_list', f'{root}/ImageNet_LT_train.txt',
            'eval_list', f'{root}/ImageNet_LT_test.txt', *TINY[:-2], 'workers', '0']


def ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def runs(save, pattern='*'):
    return sorted(glob.glob(os.path.join(str(save), pattern + '_2*')))


def cfg_for(root, *extra, config=IMAGENET1):
    return load_config(os.path.join(ROOT, config), ['data_path', root, *TINY, 'workers', '0', *extra])


# -- data -----------------------------------------------------------------------------------------------
def test_labels_are_renumbered_by_training_count_as_the_authors_do(imagenet_lt_root):
    from datasets import build_data
    data = build_data(cfg_for(imagenet_lt_root), torch.device('cpu'))
    assert data.cls_num_list == sorted(LIST_COUNTS, reverse=True)
    # label 2 (12 images) becomes class 0; the evaluation list uses the same map
    assert data.class_map.tolist() == [3, 1, 0, 4, 2]
    assert [t for p, t in zip(data.test_set.paths, data.test_set.targets) if p.startswith('val/2/')] == [0, 0]
    assert len(data.train_set) == sum(LIST_COUNTS) and len(data.test_set) == 2 * len(LIST_COUNTS)


def test_many_medium_few_by_training_count():
    splits = count_splits([500, 101, 100, 20, 19, 1])
    assert {k: v.tolist() for k, v in splits.items()} == {'many': [0, 1], 'medium': [2, 3], 'few': [4, 5]}


def test_inat_official_json_is_read(tmp_path):
    from PIL import Image
    from datasets import build_data
    root = str(tmp_path)
    os.makedirs(f'{root}/train_val2018/Plantae/7', exist_ok=True)
    images, annotations = [], []
    for i, label in enumerate([7, 7, 7, 2, 2, 0]):
        path = f'train_val2018/Plantae/7/{i}.jpg'
        Image.new('RGB', (40, 30), (label * 30, 0, 0)).save(f'{root}/{path}')
        images.append({'id': 100 + i, 'file_name': path, 'width': 40, 'height': 30})
        annotations.append({'id': 100 + i, 'image_id': 100 + i, 'category_id': label})
    for name in ('train2018.json', 'val2018.json'):
        json.dump({'images': images, 'annotations': annotations}, open(f'{root}/{name}', 'w'))
    lists = ['train_list', f'{root}/train2018.json', 'eval_list', f'{root}/val2018.json']
    with pytest.raises(UserError, match='has no image of class 1'):  # 8 classes, 3 of them with images
        build_data(cfg_for(root, 'num_classes', '8', *lists, config=INAT1), torch.device('cpu'))
    # relabel to 3 classes: the JSON's category ids must lie within num_classes
    for a in annotations:
        a['category_id'] = {7: 0, 2: 1, 0: 2}[a['category_id']]
    json.dump({'images': images, 'annotations': annotations}, open(f'{root}/train2018.json', 'w'))
    json.dump({'images': images, 'annotations': annotations}, open(f'{root}/val2018.json', 'w'))
    data = build_data(cfg_for(root, 'num_classes', '3', *lists, config=INAT1), torch.device('cpu'))
    assert data.cls_num_list == [3, 2, 1]
    x, y = next(iter(data.eval_loader()))
    assert x.shape == (4, 3, 32, 32)
    # iNat's own normalisation, not ImageNet's
    assert data.train_set.transform.transforms[-1].mean == (0.466, 0.471, 0.380)


@pytest.mark.parametrize('config', [IMAGENET1, IMAGENET2])
def test_ranks_together_load_the_single_process_batches(config, imagenet_lt_root, monkeypatch):
    """Images included: each sample's augmentation comes with its seed, so 2 ranks (one loading in-process,
    one with 2 workers) together give exactly the single-process batches, as the CIFAR loader does."""
    from datasets import build_data
    from common import distributed

    def batches(rank, world, workers):
        monkeypatch.setattr(distributed, 'rank', lambda: rank)
        monkeypatch.setattr(distributed, 'world_size', lambda: world)
        torch.manual_seed(0)
        data = build_data(cfg_for(imagenet_lt_root, 'workers', str(workers), config=config), torch.device('cpu'))
        return list(data.train_loader())

    single, rank0, rank1 = batches(0, 1, 0), batches(0, 2, 2), batches(1, 2, 0)
    assert len(single) == len(rank0) == len(rank1) == 4  # 28 images, batches of 8: the last one of 4
    assert len(single[0]) == (4 if config == IMAGENET2 else 2)  # stage 2: the dual sampler's two branches
    for whole, a, b in zip(single, rank0, rank1):
        for part, tensor in enumerate(whole):
            merged = torch.empty_like(tensor)
            merged[0::2], merged[1::2] = a[part], b[part]
            assert torch.equal(merged, tensor)
    x = torch.cat([batch[0] for batch in single])
    assert not torch.equal(x[0], x[1])  # and the samples are augmented


def test_balanced_and_dual_sampling_draws(monkeypatch):
    targets = [0] * 20 + [1] * 7 + [2] * 3
    torch.manual_seed(0)
    items = [item for _ in range(200) for batch in GlobalBatchSampler(targets, 3, 8, 'balanced', dual=True)
             for item in batch]
    classes = torch.bincount(torch.tensor([targets[i] for (i, _), _ in items]), minlength=3).float()
    assert (classes / classes.sum() - 1 / 3).abs().max() < 0.02  # class uniform
    second = torch.tensor([j for _, (j, _) in items[:30]])
    assert sorted(second.tolist()) == list(range(30))  # the fusing branch: one pass of the long-tailed set
    assert len({seed for (_, seed), _ in items}) == len(items)  # a seed of its own for every sample


def test_every_rank_gets_images_in_every_evaluation_batch(monkeypatch):
    from datasets.image_list import EvalBatchSampler
    from datasets.loaders import DeviceEvalLoader
    from common import distributed
    monkeypatch.setattr(distributed, 'world_size', lambda: 2)
    shares, cifar_shares = {}, {}
    images = torch.zeros(9, 32, 32, 3, dtype=torch.uint8).numpy()
    for rank in (0, 1):
        monkeypatch.setattr(distributed, 'rank', lambda: rank)
        shares[rank] = list(EvalBatchSampler(9, 4))  # a last batch of 1 image would leave rank 1 none
        cifar_shares[rank] = [y.tolist() for _, y in DeviceEvalLoader(images, list(range(9)), 4, 'cpu')]
    assert shares[0] == [[0, 2], [4, 6, 8]] and shares[1] == [[1, 3], [5, 7]]
    assert cifar_shares == shares  # the CIFAR loader on the device splits the test set the same way


def test_split_means_leave_out_classes_without_evaluation_images():
    from common.metrics import finalize, metric_sums
    probs = torch.eye(3)[[0, 0, 0]]  # all predicted class 0: class 0 right, class 1 wrong
    metrics = finalize(metric_sums(probs, torch.tensor([0, 0, 1])), count_splits([500, 50, 5]))  # class 2: no image
    assert (metrics['many'], metrics['medium']) == (100.0, 0.0) and metrics['few'] != metrics['few']  # nan


# -- end to end ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize('dataset', ['imagenet', 'ina2018'])
def test_both_stages_and_eval_on_workers(dataset, imagenet_lt_root, tmp_path):
    stage1, stage2 = (IMAGENET1, IMAGENET2) if dataset == 'imagenet' else (INAT1, INAT2)
    lists = inat_json_lists(imagenet_lt_root) if dataset == 'ina2018' else []
    common = ['data_path', imagenet_lt_root, *lists, 'save_dir', str(tmp_path), *TINY, 'workers', '2']
    s1 = ok(run_script('train_stage1.py', '--cfg', stage1, *common))
    assert '(IF=6, 10 evaluation images), 28 training images [12, 6, 5, 3, 2]' in s1.stdout
    run1, = runs(tmp_path, '*stage1_ce_mixup')
    ok(run_script('train_stage2.py', '--cfg', stage2, *common, 'resume', f'{run1}/ckps/model_best.pth.tar'))
    run2, = runs(tmp_path, '*stage2_ce_h2t')
    first, second = (torch.load(f'{r}/ckps/current.pth.tar', weights_only=True) for r in (run1, run2))
    assert all(torch.equal(v, second['state_dict_model'][k]) for k, v in first['state_dict_model'].items()
               if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked')))
    assert not torch.equal(first['state_dict_classifier']['fc.weight'], second['state_dict_classifier']['fc.weight'])
    ev = ok(run_script('eval.py', '--cfg', stage2, *common, 'resume', f'{run2}/ckps/current.pth.tar',
                       '--out', f'{run2}/ckps/current.eval.json'))
    metrics = json.load(open(f'{run2}/ckps/current.eval.json'))
    assert sum(metrics['reliability']['count']) == 10 and len(metrics['per_class_acc']) == 5
    assert f"top1 {metrics['top1']:.2f}" in ev.stdout


@pytest.mark.slow
def test_stage1_resumes_exactly_with_worker_processes(imagenet_lt_root, tmp_path):
    """Workers take their seeds from the checkpointed generator: 2 epochs straight = 1 epoch + resume."""
    common = ['data_path', imagenet_lt_root, *TINY, 'workers', '2', 'num_epochs', '2', 'deterministic', 'True']
    ok(run_script('train_stage1.py', '--cfg', IMAGENET1, *common, 'save_dir', str(tmp_path / 'straight')))
    ok(run_script('train_stage1.py', '--cfg', IMAGENET1, *common, 'save_dir', str(tmp_path / 'cut'), 'num_epochs', '1'))
    cut, = runs(tmp_path / 'cut')
    ok(run_script('train_stage1.py', '--cfg', IMAGENET1, *common, 'save_dir', str(tmp_path / 'cut'),
                  'resume', f'{cut}/ckps/current.pth.tar', 'auto_resume', 'True'))
    straight, = runs(tmp_path / 'straight')
    a, b = (torch.load(f'{r}/ckps/current.pth.tar', weights_only=True) for r in (straight, cut))
    assert a['epoch'] == b['epoch'] == 2
    for part in ('state_dict_model', 'state_dict_classifier'):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f'{part}.{k} differs'


@pytest.mark.slow
@pytest.mark.parametrize('dataset', ['imagenet', 'ina2018', 'places'])
def test_two_processes_with_torchrun(dataset, imagenet_lt_root, places_stage1, tmp_path):
    """2 CPU ranks (gloo), each with its own loader worker: a stage (both for ImageNet-LT), one checkpoint,
    identical weights on the ranks, the whole evaluation list evaluated once."""
    env = dict(os.environ, OMP_NUM_THREADS='1')

    def torchrun(script, cfg, common, save, *extra):  # --standalone: the rendezvous takes a free port
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--standalone',
               os.path.join(ROOT, script), '--cfg', cfg, *common, 'workers', '1', 'save_dir', str(save), *extra]
        result = ok(subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env))
        assert 'weights identical on all 2 ranks' in result.stdout
        run, = runs(save)
        summary = json.load(open(f'{run}/summary.json'))
        assert summary['world_size'] == 2 and sum(summary['last']['reliability']['count']) == 10
        return run

    common = ['data_path', imagenet_lt_root, *TINY]
    if dataset == 'imagenet':
        run1 = torchrun('train_stage1.py', IMAGENET1, common, tmp_path / 's1')
        torchrun('train_stage2.py', IMAGENET2, common, tmp_path / 's2', 'resume', f'{run1}/ckps/current.pth.tar')
    elif dataset == 'ina2018':
        torchrun('train_stage1.py', INAT1, common + inat_json_lists(imagenet_lt_root), tmp_path / 's1')
    else:
        torchrun('train_stage2.py', PLACES2, places_stage1['common'], tmp_path / 's2',
                 'resume', f'{places_stage1["run"]}/ckps/current.pth.tar')


@pytest.mark.slow
def test_places_trains_only_the_new_last_block_of_a_pretrained_resnet152(places_stage1, tmp_path):
    from models import BACKBONES
    stage1 = torch.load(f'{places_stage1["run"]}/ckps/current.pth.tar', weights_only=True)['state_dict_model']
    # everything before the new block is ImageNet's, BN statistics included; layer4.2 was left out
    assert 'layer4.2.conv1.weight' not in stage1 and 'block.conv1.weight' in stage1
    for k, v in stage1.items():
        if not k.startswith('block.'):
            assert torch.equal(v, places_stage1['imagenet'][k]), k
    torch.manual_seed(0)
    fresh = BACKBONES['resnet152_places_fe']().state_dict()
    assert not torch.equal(stage1['block.conv1.weight'], fresh['block.conv1.weight'])
    ok(run_script('train_stage2.py', '--cfg', PLACES2, *places_stage1['common'], 'save_dir', str(tmp_path),
                  'resume', f'{places_stage1["run"]}/ckps/current.pth.tar'))
    run2, = runs(tmp_path)
    stage2 = torch.load(f'{run2}/ckps/current.pth.tar', weights_only=True)['state_dict_model']
    assert torch.equal(stage2['block.conv1.weight'], stage1['block.conv1.weight'])
    ok(run_script('eval.py', '--cfg', PLACES2, *places_stage1['common'], 'resume', f'{run2}/ckps/current.pth.tar',
                  '--out', f'{run2}/ckps/current.eval.json'))
    assert sum(json.load(open(f'{run2}/ckps/current.eval.json'))['reliability']['count']) == 10


# -- bad input: one line, exit 2, nothing written ---------------------------------------------------------
def bad(*args, tmp_path, match, config=IMAGENET1):
    """The command's error, as `python train_stage1.py ...` gives it (in this process, through the script's main)."""
    save = tmp_path / 'saved'
    argv = ['--cfg', config, *TINY, 'workers', '0', 'save_dir', str(save), *args]
    assert_one_line_error(*run_main('train_stage1.py', *argv)[::2], match)
    assert not save.exists()


def broken_copy(root, tmp_path, edit):
    """The generated dataset's lists, edited, beside its images."""
    lines = open(f'{root}/ImageNet_LT_train.txt').read().splitlines()
    path = tmp_path / 'train.txt'
    path.write_text('\n'.join(edit(lines)) + '\n')
    return ['data_path', root, 'train_list', str(path)]


def test_missing_list_file(tmp_path):
    bad('data_path', str(tmp_path / 'nowhere'), tmp_path=tmp_path, match='ImageNet_LT_train.txt not found')


def test_missing_image(imagenet_lt_root, tmp_path):
    args = broken_copy(imagenet_lt_root, tmp_path, lambda lines: lines + ['train/0/gone.jpg 0'])
    bad(*args, tmp_path=tmp_path, match='1 of the 29 images')


def test_label_out_of_range(imagenet_lt_root, tmp_path):
    args = broken_copy(imagenet_lt_root, tmp_path, lambda lines: lines[:-1] + [lines[-1].split()[0] + ' 5'])
    bad(*args, tmp_path=tmp_path, match='label 5 is outside 0..4')


def test_empty_class(imagenet_lt_root, tmp_path):
    args = broken_copy(imagenet_lt_root, tmp_path, lambda lines: [x for x in lines if not x.endswith(' 3')])
    bad(*args, tmp_path=tmp_path, match='has no image of class 3')


def test_malformed_line(imagenet_lt_root, tmp_path):
    args = broken_copy(imagenet_lt_root, tmp_path, lambda lines: lines + ['train/0/0.jpg'])
    bad(*args, tmp_path=tmp_path, match='train.txt:29: expected "<image path> <label>"')


def test_missing_pretrained_weights(imagenet_lt_root, tmp_path):
    bad('data_path', imagenet_lt_root, 'backbone', 'resnet152_places_fe', 'pretrained', str(tmp_path / 'r152.pth'),
        tmp_path=tmp_path, match='r152.pth not found', config=PLACES1)


def test_places_backbone_without_pretrained_weights(imagenet_lt_root, tmp_path):
    bad('data_path', imagenet_lt_root, 'backbone', 'resnet152_places_fe', 'pretrained', '', tmp_path=tmp_path,
        match='set pretrained', config=PLACES1)


def test_an_unreadable_image_met_by_a_worker_is_one_line(imagenet_lt_root, tmp_path):
    import shutil
    root = tmp_path / 'copy'
    shutil.copytree(imagenet_lt_root, root)
    (root / 'train' / '2' / '0.jpg').write_bytes(b'not a jpeg')
    argv = ['--cfg', IMAGENET1, 'data_path', str(root), *TINY, 'workers', '1', 'save_dir', str(tmp_path / 'saved')]
    line = assert_one_line_error(*run_main('train_stage1.py', *argv)[::2], 'error: cannot decode image')
    assert 'train/2/0.jpg' in line


def test_pretrained_weights_of_another_network(imagenet_lt_root, tmp_path):
    from torchvision.models import resnet18
    torch.save(resnet18().state_dict(), tmp_path / 'r18.pth')
    bad('data_path', imagenet_lt_root, 'pretrained', str(tmp_path / 'r18.pth'), tmp_path=tmp_path,
        match='do not fit this backbone')
