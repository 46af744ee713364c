"""Dataset files are read without running code, and a broken or missing dataset is one line that names the
file, the dataset and a fix the user has."""
import os
import pickle
import urllib.error
import urllib.request

import numpy as np
import pytest

import train_stage1
from conftest import dump, run_script, write_cifar
from datasets import IMBALANCECIFAR10, IMBALANCECIFAR100
from test_data import reference_subset
from conftest import args
from common.errors import UserError
from utils.setup import run_cli

CONFIGS = {'cifar10': 'config/cifar10/cifar10_imb001_stage1_ce_mixup.yaml',
           'cifar100': 'config/cifar100/cifar100_imb001_stage1_ce_mixup.yaml'}
FOLDERS = {'cifar10': 'cifar-10-batches-py', 'cifar100': 'cifar-100-python'}
HOME = 'https://www.cs.toronto.edu/~kriz/cifar.html'


class Payload:
    """Unpickling it calls `call(*arguments)`: what a crafted file would run."""

    def __init__(self, call, arguments):
        self.call, self.arguments = call, arguments

    def __reduce__(self):
        return self.call, self.arguments


def run_main(argv, capsys):
    """train_stage1 in this process as the command line runs it: (exit status, stderr lines)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: train_stage1.main(argv))
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def tiny(tmp_path, dataset):
    return write_cifar(str(tmp_path / 'data'), dataset, train_per_class=3, test_per_class=1)


# -- crafted files -------------------------------------------------------------------------------------
# protocol 2 (as the official files) names globals with GLOBAL, protocol 4 with STACK_GLOBAL
CRAFTED = [('cifar10', 'data_batch_1', 'data', 2), ('cifar100', 'train', 'data', 2),
           ('cifar10', 'batches.meta', 'label_names', 4), ('cifar100', 'meta', 'fine_label_names', 4)]


@pytest.mark.parametrize('dataset,name,key,protocol', CRAFTED)
def test_a_crafted_file_is_refused_without_running_it(dataset, name, key, protocol, tmp_path, capsys):
    root = tiny(tmp_path, dataset)
    path = os.path.join(root, FOLDERS[dataset], name)
    marker = tmp_path / 'marker'
    with open(path, 'rb') as f:
        entry = pickle.load(f, encoding='latin1')
    entry[key] = Payload(open, (str(marker), 'w'))  # a file that runs open(marker, 'w') when unpickled
    with open(path, 'wb') as f:
        pickle.dump(entry, f, protocol=protocol)
    code, lines = run_main(args(os.path.abspath(CONFIGS[dataset]), root, tmp_path / 'saved'), capsys)
    assert not marker.exists()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f'error: {path} names io.open, which no official') and 'was not loaded' in lines[0]
    assert '`download True`' in lines[0] and HOME in lines[0]
    assert not (tmp_path / 'saved').exists()


def test_a_crafted_batch_is_refused_by_the_command(tmp_path):
    root = tiny(tmp_path, 'cifar100')
    path = os.path.join(root, 'cifar-100-python', 'train')
    marker = tmp_path / 'marker'
    with open(path, 'rb') as f:
        entry = pickle.load(f, encoding='latin1')
    entry['data'] = Payload(os.system, (f'touch {marker}',))
    dump(entry, path)
    result = run_script('train_stage1.py', *args(CONFIGS['cifar100'], root, tmp_path / 'saved'))
    assert not marker.exists()
    assert result.returncode == 2 and result.stderr.count('\n') == 1, result.stderr[-2000:]
    assert result.stderr.startswith(f'error: {path} names posix.system, which no official CIFAR-100 file does')
    assert not (tmp_path / 'saved').exists()


# -- broken files --------------------------------------------------------------------------------------
def truncate(entry, path):
    with open(path, 'rb') as f:
        head = f.read(700)
    with open(path, 'wb') as f:
        f.write(head)


def rename_labels(entry, path):  # a CIFAR-10 batch where CIFAR-100 is expected
    entry['labels'] = entry.pop('fine_labels')
    dump(entry, path)


def images_as_hwc(entry, path):  # the same bytes in torchvision's [N, 32, 32, 3] layout
    entry['data'] = entry['data'].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    dump(entry, path)


def short_rows(entry, path):
    entry['data'] = entry['data'][:, :1536].copy()
    dump(entry, path)


def label_out_of_range(entry, path):
    entry['fine_labels'][3] = 100
    dump(entry, path)


BROKEN = [(truncate, 'the file is corrupt or truncated'), (rename_labels, 'has no fine_labels (its keys: '),
          (images_as_hwc, 'data is uint8 [300, 32, 32, 3], not uint8 [N, 3072] images'),
          (short_rows, 'data is uint8 [300, 1536], not uint8 [N, 3072] images'),
          (label_out_of_range, 'fine_labels run from 0 to 100, outside 0..99 of CIFAR-100')]


@pytest.mark.parametrize('breaks,message', BROKEN, ids=[b.__name__ for b, _ in BROKEN])
def test_a_broken_batch_is_one_line_naming_the_file(breaks, message, tmp_path):
    root = tiny(tmp_path, 'cifar100')
    path = os.path.join(root, 'cifar-100-python', 'train')
    with open(path, 'rb') as f:
        breaks(pickle.load(f, encoding='latin1'), path)
    with pytest.raises(UserError) as e:
        IMBALANCECIFAR100(root)
    msg = str(e.value)
    assert '\n' not in msg and path in msg and message in msg, msg
    assert '`download True`' in msg and HOME in msg and 'CIFAR-10 ' not in msg, msg


# -- downloads -----------------------------------------------------------------------------------------
def no_network(monkeypatch):
    def refuse(*a, **kw):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(urllib.request, 'urlopen', refuse)  # torchvision's download calls it


@pytest.mark.parametrize('existing', [False, True])
def test_a_failed_download_is_one_line_and_leaves_nothing(existing, tmp_path, monkeypatch, capsys):
    """`download` is on by default: without a network the run stops with one line and leaves no folder or file
    that was not there before (data_path itself included)."""
    no_network(monkeypatch)
    data = tmp_path / 'data' / 'cifar100'
    if existing:
        data.mkdir(parents=True)
        (data / 'notes.txt').write_text('mine')
    before = sorted(p for p in tmp_path.rglob('*'))
    code, lines = run_main(['--cfg', CONFIGS['cifar100'], 'data_path', str(data), 'save_dir', str(tmp_path / 's'),
                            'device', 'cpu', 'compile', 'False'], capsys)
    assert code == 2 and lines == [f'error: could not download CIFAR-100 to {data} (URLError: no network); no network? '
                                   f'put the official cifar-100-python/ folder there'], lines
    assert sorted(p for p in tmp_path.rglob('*')) == before


def test_a_download_cut_off_halfway_leaves_nothing(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    def half_a_download(url, download_root, filename, md5):
        with open(os.path.join(download_root, filename), 'wb') as f:
            f.write(b'\x1f\x8b half an archive')
        raise ConnectionResetError('connection reset')
    monkeypatch.setattr(torchvision.datasets.utils, 'download_and_extract_archive', half_a_download)
    no_network(monkeypatch)
    with pytest.raises(UserError, match=r'^could not download CIFAR-10 to .* \(ConnectionResetError: connection '):
        IMBALANCECIFAR10(str(tmp_path / 'data'), download=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('existing', [False, True])
def test_a_download_is_moved_into_place_when_complete(existing, tmp_path, monkeypatch):
    """What the official archive unpacks to lands in data_path (only the missing files, when some are there)."""
    import torchvision.datasets.utils

    def unpacks_the_archive(url, download_root, filename, md5):
        assert url == 'https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz' and md5
        write_cifar(download_root, 'cifar100', train_per_class=3, test_per_class=1, seed=1)
    monkeypatch.setattr(torchvision.datasets.utils, 'download_and_extract_archive', unpacks_the_archive)
    no_network(monkeypatch)
    data = tmp_path / 'data'
    if existing:  # the user's own train and test, meta missing: those two are kept
        write_cifar(str(data), 'cifar100', train_per_class=3, test_per_class=1, seed=2)
        os.remove(data / 'cifar-100-python' / 'meta')
    train = IMBALANCECIFAR100(str(data), imb_factor=1, download=True)
    assert os.listdir(data) == ['cifar-100-python']
    assert sorted(os.listdir(data / 'cifar-100-python')) == ['meta', 'test', 'train']
    expected = write_cifar(str(tmp_path / 'expected'), 'cifar100', train_per_class=3, test_per_class=1,
                           seed=2 if existing else 1)
    assert np.array_equal(train.data, IMBALANCECIFAR100(expected, imb_factor=1).data)
    assert train.classes == [f'f{i}' for i in range(100)]


# -- files that load ---------------------------------------------------------------------------------------
def plain_pickle(path):
    with open(path, 'rb') as f:
        return pickle.load(f, encoding='latin1')


def check_same_as_plain_pickle(root, dataset_class, imb_factor=1):
    folder = os.path.join(root, dataset_class.base_folder)
    test = dataset_class(root, train=False)
    raw = plain_pickle(os.path.join(folder, dataset_class.test_files[0]))
    assert test.data.tobytes() == raw['data'].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).tobytes()
    assert test.targets == raw[dataset_class.label_key]
    entries = [plain_pickle(os.path.join(folder, name)) for name in dataset_class.train_files]
    data = np.concatenate([e['data'] for e in entries]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.asarray(sum((e[dataset_class.label_key] for e in entries), []))
    train = dataset_class(root, imb_factor=imb_factor)
    keep = reference_subset(labels, train.img_num_list)
    assert train.data.tobytes() == data[keep].tobytes() and train.targets == labels[keep].tolist()
    assert train.classes == plain_pickle(os.path.join(folder, dataset_class.meta_file))[dataset_class.meta_key]


@pytest.mark.parametrize('dataset_class,fixture', [(IMBALANCECIFAR10, 'cifar10_root'),
                                                   (IMBALANCECIFAR100, 'cifar100_root')])
def test_generated_official_format_files_load_as_with_plain_pickle(dataset_class, fixture, request):
    check_same_as_plain_pickle(request.getfixturevalue(fixture), dataset_class, imb_factor=0.1)


REAL_CIFAR100 = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data', 'cifar100')


@pytest.mark.skipif(not os.path.isfile(os.path.join(REAL_CIFAR100, 'cifar-100-python', 'meta')),
                    reason='the official CIFAR-100 is not in data/cifar100 (`download True` fetches it)')
def test_the_official_cifar100_files_load_byte_for_byte_as_with_plain_pickle():
    check_same_as_plain_pickle(REAL_CIFAR100, IMBALANCECIFAR100)

