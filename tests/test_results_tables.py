"""The README's results agree with the runs they report: each figure of its tables against the runs recorded in
results/<folder>/metrics.json (mean and sample sd over seeds, computed here), seeds.csv against the same runs, and
each model-zoo `eval.py` line's figure against the eval.json beside its weights. Table rows are found by their
headers and matched to their folders by content, so their order does not matter."""
import csv
import glob
import json
import os
import re
import statistics

import pytest

from conftest import ROOT

README = os.path.join(ROOT, 'README.md')
IMB = {200: '0005', 100: '001', 50: '002', 10: '01'}  # the config and results folders' imb_factor code
# `best`, `best ± sd` or `best (sd)`, then `(last x)`, maybe a footnote mark (*, †, ‡)
FIGURE = re.compile(r'^(?P<best>\d+\.\d+)(?: ± (?P<sd>\d+\.\d+)| \((?P<sd2>\d+\.\d+)\))?'
                    r'(?: \(last (?P<last>\d+\.\d+)\))?[*†‡]?$')


LINK = re.compile(r'\[([^\]]*)\]\([^)]*\)')


def tables(text):
    """Every markdown table: (header cells, [row cells, ...]), links reduced to their text."""
    found, block = [], []
    for line in text.splitlines() + ['']:
        if line.startswith('|'):
            block.append([LINK.sub(r'\1', cell).strip() for cell in line.strip().strip('|').split('|')])
        elif block:
            found.append((block[0], [row for row in block[2:]]))
            block = []
    return found


def table(*first_cells):
    """The README's tables whose first header cells start with `first_cells` (`method` finds `method` and
    `method, CIFAR-10-LT`)."""
    n = len(first_cells)
    matches = [t for t in tables(open(README).read())
               if len(t[0]) >= n and all(cell.startswith(want) for cell, want in zip(t[0], first_cells))]
    assert matches, f'README has no table whose columns start {first_cells}'
    return matches


def runs(folder):
    path = os.path.join(ROOT, 'results', folder, 'metrics.json')
    assert os.path.isfile(path), f'the README reports results/{folder}, which holds no metrics.json'
    return json.load(open(path))['runs']


def stage1_runs(folder):
    return [r for r in runs(folder) if r['stage'] == 'stage1']


def stage2_runs(folder, rho, start='best'):
    return [r for r in runs(folder) if r['stage'] == 'stage2' and r.get('from', 'best') == start
            and abs(r['H2T'] - rho) < 1e-9]


def h2t_runs(folder):
    """The folder's H2T stage-2 runs: its one non-zero rho (0.25, or a method's own, e.g. ResLT's 0.4)."""
    rhos = {r['H2T'] for r in runs(folder) if r['stage'] == 'stage2' and r.get('from', 'best') == 'best'} - {0.0}
    assert len(rhos) == 1, f'results/{folder} holds H2T runs at rho {sorted(rhos)}; the table reports one rho'
    return stage2_runs(folder, rhos.pop())


def close(shown, value):
    """`shown` is `value` rounded to the shown decimals."""
    decimals = len(shown.split('.')[1])
    return abs(float(shown) - value) <= 0.5 * 10 ** -decimals + 1e-9


def check_figure(cell, selected, what, single_unless_sd=True):
    """A cell `best [± sd] [(last x)]` against the runs it reports: their mean best and last top-1, and the sample
    sd over them where the cell gives one (a cell without one reports one run, unless the table says means)."""
    m = FIGURE.match(cell)
    assert m, f'{what}: cannot read {cell!r}'
    assert selected, f'{what}: {cell} but no such run is recorded'
    best = [r['best']['top1'] for r in selected]
    assert close(m['best'], statistics.mean(best)), f'{what}: {cell} against {best}'
    sd = m['sd'] or m['sd2']
    if sd:
        assert len(best) > 1 and close(sd, statistics.stdev(best)), f'{what}: {cell} against {best}'
    elif single_unless_sd:
        assert len(best) == 1, f'{what}: {cell} gives no spread for {len(best)} runs'
    if m['last']:
        last = [r['last']['top1'] for r in selected]
        assert close(m['last'], statistics.mean(last)), f'{what}: {cell} against last {last}'
    return float(m['best'])


def zoo_top1(folder, name):
    """top-1 of eval.py's record (eval.json) of results/<folder>/weights/<name>.pth.tar."""
    path = os.path.join(ROOT, 'results', folder, 'weights', f'{name}.eval.json')
    assert os.path.isfile(path), f'results/{folder}/weights has no {name}.pth.tar evaluated'
    return json.load(open(path))['top1']


def check_zoo_figure(cell, folder, what):
    """A stage-1 cell `best (last x)` against eval.py's records of the zoo's best and last stage-1 weights, which
    are those of the folder's one stage-1 run."""
    m = FIGURE.match(cell)
    assert m and not (m['sd'] or m['sd2']), f'{what}: cannot read {cell!r}'
    run, = stage1_runs(folder)
    best = zoo_top1(folder, f"stage1_{run['name'].split('_stage1_')[1]}_best")
    assert close(m['best'], best), f'{what}: {cell}, eval.py {best}'
    if m['last']:
        last = zoo_top1(folder, f"stage1_{run['name'].split('_stage1_')[1]}_last")
        assert close(m['last'], last), f'{what}: {cell}, eval.py on the last epoch {last}'


def test_main_table_agrees_with_the_recorded_runs():
    checked = 0
    for header, rows in table('dataset', 'IF'):
        for row in rows:
            dataset = 'cifar100' if 'CIFAR-100' in row[0] else 'cifar10'
            folder = f'{dataset}_imb{IMB[int(row[1].rstrip("*"))]}'
            for name, cell in zip(header, row):
                if 'here' not in name or cell == '-':
                    continue
                what = f'{row[0]} IF {row[1]}, {name}'
                if name.startswith('stage 1'):  # what eval.py prints for the zoo's weights of the run
                    check_zoo_figure(cell, folder, what)
                else:
                    check_figure(cell, stage2_runs(folder, 0.0 if 'rho=0' in name else 0.25), what)
                checked += 1
    assert checked >= 4


def test_methods_table_agrees_with_the_recorded_runs_and_its_differences():
    """Each `here, IF N` cell of the methods tables (CIFAR-100-LT's, and CIFAR-10-LT's whose first column says so)
    against results/<dataset>_imb<N>_<method> (a method's row: its stage 2 without H2T, rho 0; + H2T: its H2T
    runs), and its `difference, IF N` to the anchor (empty where the anchor column has no figure, `-`)."""
    checked = 0
    for header, rows in table('method'):
        dataset = 'cifar10' if 'CIFAR-10-LT' in header[0] else 'cifar100'
        paper_ifs = [int(x) for x in re.findall(r'\d+', header[1])]
        for row in rows:
            cells = dict(zip(header, row))
            for name, here in cells.items():
                found = re.fullmatch(r'here, IF (\d+)', name)
                if not found or here.startswith('-'):
                    continue
                if_here = int(found[1])
                method = row[0].replace(' + H2T', '')
                folder = f'{dataset}_imb{IMB[if_here]}_{method.lower().replace("-", "_")}'
                what = f'{row[0]}, IF {if_here}'
                selected = h2t_runs(folder) if '+ H2T' in row[0] else stage2_runs(folder, 0.0)
                value = check_figure(here, selected, what)
                paper = row[1].split('/')[paper_ifs.index(if_here)].strip()
                difference = cells[f'difference, IF {if_here}']
                if paper == '-':
                    assert difference == '', f'{what}: a difference {difference} to no paper figure'
                else:
                    assert close(difference, value - float(paper)), f'{what}: difference {difference}'
                checked += 1
    assert checked >= 4


def rho_table_folder():
    """The results folder the rho table's plots (the line after it) come from."""
    text = open(README).read()
    after = text[text.index('| rho |'):]
    return re.search(r'results/([\w.-]+)/', after)[1]


def test_rho_table_agrees_with_the_recorded_runs():
    (header, rows), = table('rho')
    folder = rho_table_folder()
    by_name = {row[0]: row[1:] for row in rows}
    for rho, here, many_few in zip(header[1:], by_name['here'], by_name['many / few here']):
        selected = stage2_runs(folder, float(rho))
        if here == '':
            continue
        check_figure(here, selected, f'rho {rho}', single_unless_sd=False)  # the table gives means over seeds
        many, few = many_few.split(' / ')
        assert close(many, statistics.mean(r['best']['many'] for r in selected)), f'rho {rho}: many {many}'
        assert close(few, statistics.mean(r['best']['few'] for r in selected)), f'rho {rho}: few {few}'


SEEDS_CSV = sorted(glob.glob(os.path.join(ROOT, 'results', '*', 'seeds.csv'))
                   + glob.glob(os.path.join(ROOT, 'results', '*', '*', 'seeds.csv')))  # and a folder's sub-records


@pytest.mark.parametrize('folder', [os.path.relpath(os.path.dirname(p), os.path.join(ROOT, 'results')) for p in SEEDS_CSV])
def test_seeds_csv_is_the_statistics_of_the_recorded_runs(folder):
    for row in csv.DictReader(open(os.path.join(ROOT, 'results', folder, 'seeds.csv'))):
        selected = stage2_runs(folder, float(row['rho']), row['from'])
        assert sorted(str(r.get('seed', 0)) for r in selected) == sorted(row['seeds'].split())
        for which in ('best', 'last'):
            values = [r[which]['top1'] for r in selected]
            assert float(row[f'{which}_top1_mean']) == pytest.approx(statistics.mean(values), abs=1e-3)
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            assert float(row[f'{which}_top1_sd']) == pytest.approx(sd, abs=1e-3)


ZOO_FOLDERS = sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(ROOT, 'results', '*', 'weights')))
READMES = [README] + [os.path.join(ROOT, 'results', folder, 'README.md') for folder in ZOO_FOLDERS]


@pytest.mark.parametrize('readme', [os.path.relpath(p, ROOT) for p in READMES])
def test_model_zoo_eval_lines_give_the_figures_of_their_weights(readme):
    """`python eval.py --cfg C resume W   # 48.12`: W is committed and its eval.json (eval.py's output) says 48.12."""
    text = open(os.path.join(ROOT, readme)).read()
    # the shell variables the README's commands use (`W=results/...`, `S1=config/... S2=...`)
    variables = dict(re.findall(r'(?:^|\s)([A-Z][A-Z0-9_]*)=(\S+)', text, re.M))
    lines = re.findall(r'^\s*python eval\.py --cfg (\S+) resume (\S+)\s+# (?:[^#\n:]*: )?(\d+\.\d+)', text, re.M)
    assert lines, f'{readme} shows no model-zoo eval.py line'
    for config, weights, shown in lines:
        config, weights = (re.sub(r'\$(\w+)', lambda m: variables[m[1]], v) for v in (config, weights))
        assert os.path.isfile(os.path.join(ROOT, config)) and os.path.isfile(os.path.join(ROOT, weights)), weights
        evaluated = json.load(open(os.path.join(ROOT, weights.removesuffix('.pth.tar') + '.eval.json')))
        assert close(shown, evaluated['top1']), f'{weights}: README {shown}, eval.json {evaluated["top1"]}'


@pytest.mark.parametrize('folder', ZOO_FOLDERS)
def test_every_zoo_file_has_an_eval_line(folder):
    """A reader finds each committed weights file beside the command that evaluates it and its figure."""
    text = open(README).read() + open(os.path.join(ROOT, 'results', folder, 'README.md')).read()
    for weights in sorted(glob.glob(os.path.join(ROOT, 'results', folder, 'weights', '*.pth.tar'))):
        path = os.path.relpath(weights, ROOT)
        assert re.search(rf'python eval\.py --cfg \S+ resume {re.escape(path)}\s+# ', text), f'{path}: no eval.py line'
