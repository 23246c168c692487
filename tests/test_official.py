"""The converter of official GRU4Rec parameters (python -m paddlerec.official), the configs ported
from the official paramfiles, and README's mapping table."""

import copy
import os
import re

import pytest
import yaml

from paddlerec import official
from paddlerec.config import apply_override, load_config

from .helpers import REPO

# The official parameter strings of each ported paramfile (the values of hidasib/GRU4Rec_PyTorch_Official's
# paramfiles/*.py, as run.py -ps takes them).
PORTED = {
    "xe_shared.yaml": ("rsc15_xe_shared_100_best.py",
                       "loss=cross-entropy,constrained_embedding=True,embedding=0,elu_param=0,layers=100,n_epochs=10,"
                       "batch_size=32,dropout_p_embed=0.0,dropout_p_hidden=0.4,learning_rate=0.2,momentum=0.2,"
                       "n_sample=2048,sample_alpha=0.5,bpreg=0.0,logq=1.0"),
    "yoochoose_xe_shared.yaml": ("yoochoose_xe_shared_best.py",
                                 "loss=cross-entropy,constrained_embedding=True,embedding=0,elu_param=0,layers=480,"
                                 "n_epochs=10,batch_size=48,dropout_p_embed=0.0,dropout_p_hidden=0.2,learning_rate=0.07,"
                                 "momentum=0.0,n_sample=2048,sample_alpha=0.2,bpreg=0.0,logq=1.0"),
    "rees46_xe_shared.yaml": ("rees46_xe_shared_best.py",
                              "loss=cross-entropy,constrained_embedding=True,embedding=0,elu_param=0,layers=512,"
                              "n_epochs=10,batch_size=240,dropout_p_embed=0.45,dropout_p_hidden=0.0,learning_rate=0.065,"
                              "momentum=0.0,n_sample=2048,sample_alpha=0.5,bpreg=0.0,logq=1.0"),
    "coveo_bprmax_shared.yaml": ("coveo_bprmax_shared_best.py",
                                 "loss=bpr-max,constrained_embedding=True,embedding=0,elu_param=1,layers=512,n_epochs=10,"
                                 "batch_size=144,dropout_p_embed=0.35,dropout_p_hidden=0.0,learning_rate=0.05,"
                                 "momentum=0.4,n_sample=2048,sample_alpha=0.2,bpreg=1.85,logq=0.0"),
    "bprmax_shared.yaml": ("retailrocket_bprmax_shared_best.py",
                           "loss=bpr-max,constrained_embedding=True,embedding=0,elu_param=0.5,layers=224,n_epochs=10,"
                           "batch_size=80,dropout_p_embed=0.5,dropout_p_hidden=0.05,learning_rate=0.05,momentum=0.4,"
                           "n_sample=2048,sample_alpha=0.4,bpreg=1.95,logq=0.0"),
    "diginetica_bprmax_shared.yaml": ("diginetica_bprmax_shared_best.py",
                                      "loss=bpr-max,constrained_embedding=True,embedding=0,elu_param=1,layers=512,"
                                      "n_epochs=10,batch_size=128,dropout_p_embed=0.5,dropout_p_hidden=0.3,"
                                      "learning_rate=0.05,momentum=0.15,n_sample=2048,sample_alpha=0.3,bpreg=0.9,"
                                      "logq=0.0"),
}


def convert(text, **options):
    return official.overrides(official.parse_parameter_string(text), **options)


def test_the_official_readme_example():
    text = ("layers=224,batch_size=80,dropout_p_embed=0.5,dropout_p_hidden=0.05,learning_rate=0.05,momentum=0.4,"
            "n_sample=2048,sample_alpha=0.4,bpreg=1.95,logq=0.0,loss=bpr-max,constrained_embedding=True,"
            "elu_param=0.5,n_epochs=10")
    assert convert(text) == [
        "hyper_parameters.layers=[224]", "dataset.dataset_train.batch_size=80", "hyper_parameters.dropout_embed=0.5",
        "hyper_parameters.dropout_hidden=0.05", "hyper_parameters.optimizer.learning_rate=0.05",
        "hyper_parameters.optimizer.momentum=0.4", "hyper_parameters.n_sample=2048", "hyper_parameters.sample_alpha=0.4",
        "hyper_parameters.bpreg=1.95", "hyper_parameters.logq=0.0", "hyper_parameters.loss=bpr-max",
        "hyper_parameters.embedding=shared", "hyper_parameters.elu_param=0.5", "runner.cpu_train_runner.epochs=10"]


@pytest.mark.parametrize("text, expected", [
    ("constrained_embedding=True,embedding=64", ["hyper_parameters.embedding=shared"]),  # the official code ignores 64
    ("constrained_embedding=False", ["hyper_parameters.embedding=none"]),
    ("embedding=64,constrained_embedding=False",
     ["hyper_parameters.embedding=separate", "hyper_parameters.embedding_size=64"]),
    ("constrained_embedding=0,embedding=layersize",
     ["hyper_parameters.embedding=separate", "hyper_parameters.embedding_size=0"]),
    ("embedding=32", ["hyper_parameters.embedding=shared"]),  # constrained_embedding defaults to True
    ("layers=200/100", ["hyper_parameters.layers=[200,100]"]),
    ("final_act=elu-0.5,loss=bpr-max", ["hyper_parameters.loss=bpr-max", "hyper_parameters.elu_param=0.5"]),
    ("final_act=linear", ["hyper_parameters.elu_param=0.0"]),
    ("final_act=softmax,hidden_act=tanh,adapt=adagrad,lmbd=0.0,time_sort=True,n_sample=0",
     ["hyper_parameters.n_sample=0"]),
])
def test_converter_cases(text, expected):
    assert convert(text) == expected


def test_converter_names_the_train_runner_and_dataset():
    assert convert("n_epochs=5,batch_size=64", train_runner="r", train_dataset="d") == [
        "runner.r.epochs=5", "dataset.d.batch_size=64"]


def test_converter_defaults_fill_what_the_string_leaves_out():
    result = convert("layers=64", with_defaults=True)
    assert result[0] == "hyper_parameters.layers=[64]"
    assert "dataset.dataset_train.batch_size=64" in result and "hyper_parameters.bpreg=1.0" in result
    assert "hyper_parameters.embedding=shared" in result and len(result) == len(official.OFFICIAL_KEYS) - 1


@pytest.mark.parametrize("text, fragment", [
    ("hidden_act=relu", "hidden_act=relu has no counterpart here"),
    ("loss=top1", "loss=top1: this model trains cross-entropy, bpr-max, top1-max"),
    ("final_act=relu", "final_act=relu"),
    ("layers=abc", "layers=abc: expected layer sizes"),
    ("n_epochs=2.5", "n_epochs=2.5: expected an int"),
    ("constrained_embedding=yes", "expected True or False"),
    ("n_sampel=10", "n_sampel is not an official GRU4Rec parameter; known: "),
    ("layers=100,layers=200", "layers is given twice"),
    ("layers", "'layers' is not NAME=VALUE"),
    ("final_act=elu-1,elu_param=0.5", "final_act and elu_param disagree"),
])
def test_converter_refuses_what_it_cannot_express(text, fragment):
    with pytest.raises(official.OfficialParamError) as caught:
        convert(text)
    assert fragment in str(caught.value)


def test_paramfile_is_read_without_running_it(tmp_path):
    path = tmp_path / "params.py"
    path.write_text("from collections import OrderedDict\ngru4rec_params = OrderedDict([\n('loss', 'bpr-max'),\n"
                    "('layers', [96, 48]),\n('constrained_embedding', False),\n('embedding', 0),\n"
                    "('batch_size', 24),\n('learning_rate', 0.1)\n])\n")
    assert official.overrides(official.read_parameter_file(str(path))) == convert(
        "loss=bpr-max,layers=96/48,constrained_embedding=False,embedding=0,batch_size=24,learning_rate=0.1")
    path.write_text("import os\ngru4rec_params = dict(os.environ)\n")
    with pytest.raises(official.OfficialParamError, match="assigns no literal gru4rec_params"):
        official.read_parameter_file(str(path))


def test_command_line(capsys):
    assert official.main(["layers=100,batch_size=32,loss=cross-entropy"]) == 0
    assert capsys.readouterr().out == ("-o hyper_parameters.layers=[100] -o dataset.dataset_train.batch_size=32 "
                                       "-o hyper_parameters.loss=cross-entropy\n")
    assert official.main(["--lines", "n_epochs=3"]) == 0
    assert capsys.readouterr().out == "runner.cpu_train_runner.epochs=3\n"
    assert official.main(["sigma=0.1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sigma=0.1 has no counterpart here") and len(err.splitlines()) == 1
    assert official.main([]) == 2
    assert "pass a parameter string or --file" in capsys.readouterr().err


def test_the_printed_overrides_work_in_a_command_substitution(tmp_path):
    """What README shows: python -m paddlerec.run -m CONFIG $(python -m paddlerec.official "...")."""
    import subprocess
    import sys

    from .helpers import make_workspace

    config = make_workspace(tmp_path)
    command = (f'"{sys.executable}" -m paddlerec.official "layers=16/8,learning_rate=0.1" --train-runner train '
               f'--train-dataset train_data')
    script = (f'cd "{REPO}" && "{sys.executable}" -c "import sys; from paddlerec.config import load_config; '
              f'c = load_config(sys.argv[1], sys.argv[2:][1::2]); print(c.hyper_parameters)" "{config}" $({command})')
    proc = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "'layers': [16, 8]" in proc.stdout and "'learning_rate': 0.1" in proc.stdout


@pytest.mark.parametrize("name", sorted(PORTED))
def test_ported_configs_hold_their_paramfile(name):
    """Applying the converted official parameters to the ported config changes nothing, and the
    header names the source file and its published result."""
    path = os.path.join(REPO, "configs", name)
    source, text = PORTED[name]
    with open(path, encoding="utf-8") as f:
        content = f.read()
    header = "".join(line for line in content.splitlines(True) if line.startswith("#"))
    assert f"paramfiles/{source}" in header
    assert re.search(r"Published .*Recall@20 0\.\d{4}, MRR@20 0\.\d{4}", header.replace("\n# ", " "))
    raw = yaml.safe_load(content)
    converted = copy.deepcopy(raw)
    for override in convert(text):
        apply_override(converted, override)
    assert converted == raw
    load_config(path, check_files=False)


def test_every_official_paramfile_is_ported():
    headers = []
    for name in os.listdir(os.path.join(REPO, "configs")):
        with open(os.path.join(REPO, "configs", name), encoding="utf-8") as f:
            headers += re.findall(r"paramfiles/(\w+\.py)", f.read())
    assert sorted(set(headers)) == sorted(source for source, _ in PORTED.values())


def test_readme_lists_the_mapping():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert official.mapping_table() in readme
    assert "0.6789" in readme and "0.3024" in readme
    assert "configs/rsc15_full" not in readme  # the Yoochoose paramfile is configs/yoochoose_xe_shared.yaml
