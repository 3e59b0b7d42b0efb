"""The paper authors' released neuron files (issue 17 item 7): ``dictionaries.yaml`` read through every entry
point (NeuronSet.load, load_neurons, Steering, the condition syntax, conditions files) on a model of the real
widths built on the meta device, our sets written in the same format, and the meaning of ``layers="late"``.

References are independent of the code under test: flat indices split by hand (``divmod(i, d_mlp)``) and the
authors' own loader, re-typed below (``{int(k): v for k, v in yaml.safe_load(f)[name].items()}``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

import nnsight_vla as nv
from nnsight_vla.errors import InputError
from nnsight_vla.neurons import NeuronSet, layer_subset
from nnsight_vla.rollout.conditions import Condition, load_conditions, parse_conditions
from nnsight_vla.steering import Steering, export_neurons, load_neurons

DATA = Path(__file__).parent / "data"
OPENVLA_D_MLP, OPENVLA_LAYERS = 11008, 32
FAST_D_MLP, FAST_LAYERS = 16384, 18

# the flat indices of the authors' OpenVLA "up_20" entry (its first ten are "up_10"); tokens shortened
UP_20 = [237682, 302720, 205792, 302565, 274043, 229524, 246382, 263704, 246526, 285347,
         173492, 263055, 345008, 299817, 245548, 270236, 346069, 258007, 276423, 227857]
TOKENS = {237682: ["up", "Up", "[action: -0.227]"], 302720: ["raised", "raise"], 173492: ["high", "top", "高"]}
# the authors' pi0-FAST file: bare lists of flat indices (d_mlp 16384, 18 layers)
FAST_FILE = "high_cluster:\n  - 256459\n  - 260217\n  - 40857\n\nlow_cluster:\n  - 5674\n  - 253282\n  - 257247\n"


def authors_loader(path: Path, name: str) -> dict[int, list]:
    """The authors' load_intervention_dict, re-typed: ``{int(flat): tokens}`` of one entry."""
    all_dicts = yaml.safe_load(path.read_text()) or {}
    raw = all_dicts[name] or {}
    return {int(k): v for k, v in raw.items()}


def write_openvla_file(folder: Path) -> Path:
    def entry(indices):
        return "\n".join(f"  {i}: {json.dumps(TOKENS.get(i, ['w' + str(i % 97)]), ensure_ascii=False)}"
                         for i in indices)

    path = folder / "dictionaries.yaml"
    path.write_text(f"blank: {{}}\n\nup_10:\n{entry(UP_20[:10])}\n\nup_20:\n{entry(UP_20)}\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def openvla_7b(tmp_path_factory):
    """OpenVLA-7B's architecture from its config alone, on the meta device (no weights, no memory)."""
    from nnsight_vla.models.tokenizer import build_llama_style_tokenizer

    folder = tmp_path_factory.mktemp("openvla-7b")
    shutil.copy(DATA / "openvla_7b_config.json", folder / "config.json")
    shutil.copy(DATA / "openvla_7b_preprocessor_config.json", folder / "preprocessor_config.json")
    build_llama_style_tokenizer().save_pretrained(str(folder))
    vla = nv.load("openvla", str(folder))
    assert not vla.dispatched and (vla.num_layers, vla.d_mlp) == (OPENVLA_LAYERS, OPENVLA_D_MLP)
    return vla


def test_the_authors_openvla_file_through_every_entry_point(openvla_7b, tmp_path):
    vla = openvla_7b
    path = write_openvla_file(tmp_path)
    want = sorted(divmod(i, OPENVLA_D_MLP) for i in authors_loader(path, "up_20"))
    assert len(want) == 20
    neurons = NeuronSet.load(path, key="up_20", d_mlp=vla.d_mlp)
    assert list(neurons.pairs) == want and neurons.name == "up_20" and neurons.d_mlp == OPENVLA_D_MLP
    assert neurons.meta["tokens"][str(237682)] == TOKENS[237682]
    neurons.validate(vla)  # every neuron exists in the 32 x 11008 backbone
    assert NeuronSet.load(f"{path}#up_20", d_mlp=vla.d_mlp) == neurons
    assert load_neurons(path, key="up_20", d_mlp=vla.d_mlp) == neurons
    assert NeuronSet.load(path, key="up_10", d_mlp=vla.d_mlp).pairs == tuple(
        sorted(divmod(i, OPENVLA_D_MLP) for i in UP_20[:10]))
    # the layers of their sets: up_10 in 18, 20-25, 27 (STACK.md); up_20 reaches down to layer 15
    assert NeuronSet.load(path, key="up_10", d_mlp=vla.d_mlp).layers == [18, 20, 21, 22, 23, 24, 25, 27]
    assert min(neurons.layers) == 15 and divmod(173492, OPENVLA_D_MLP) == (15, 8372)
    # a Steering and the command-line syntax (d_mlp from the model) steer the same neurons
    steer = Steering(path, 4.0, key="up_20", d_mlp=vla.d_mlp)
    assert steer.resolve(vla).pairs == neurons.pairs
    (cond,) = parse_conditions([f"steer:{path}#up_20@4"], d_mlp=vla.d_mlp)
    assert cond.steering.resolve(vla).pairs == neurons.pairs and cond.alpha == 4.0 and cond.concept == "up_20"


def test_late_is_the_second_half_and_keeps_19_of_up_20(openvla_7b, tmp_path):
    vla = openvla_7b
    path = write_openvla_file(tmp_path)
    assert layer_subset("late", 32) == list(range(16, 32)) and layer_subset("early", 32) == list(range(16))
    assert layer_subset("late", 18) == list(range(9, 18))
    late = Steering(path, 4.0, key="up_20", d_mlp=vla.d_mlp, layers="late").resolve(vla)
    everything = Steering(path, 4.0, key="up_20", d_mlp=vla.d_mlp, layers="all").resolve(vla)
    early = Steering(path, 4.0, key="up_20", d_mlp=vla.d_mlp, layers="early").resolve(vla)
    assert len(everything) == 20 and len(late) == 19 and early.pairs == ((15, 8372),)
    assert set(late.pairs) | set(early.pairs) == set(everything.pairs)
    (cond,) = parse_conditions([f"steer:{path}#up_20@4/late"], d_mlp=vla.d_mlp)
    assert cond.steering.resolve(vla).pairs == late.pairs
    # with the depth in the file reference, no model is needed to restrict
    alone = NeuronSet.load(path, key="up_20", d_mlp=OPENVLA_D_MLP, num_layers=OPENVLA_LAYERS)
    assert alone.restrict("late").pairs == late.pairs
    doc = layer_subset.__doc__
    assert "up_20" in doc and "19 of 20" in doc and "15" in doc


def test_errors_name_the_key_the_entries_and_the_width(tmp_path):
    path = write_openvla_file(tmp_path)
    for load in (lambda **kw: NeuronSet.load(path, **kw), lambda **kw: load_neurons(path, **kw)):
        with pytest.raises(InputError, match=r"pick one with key= .*\['up_10', 'up_20'\]"):
            load(d_mlp=OPENVLA_D_MLP)
        with pytest.raises(InputError, match=r"no entry 'fast'; entries: \['blank', 'up_10', 'up_20'\]"):
            load(key="fast", d_mlp=OPENVLA_D_MLP)
        with pytest.raises(InputError, match="'blank'.* is empty .*baseline"):
            load(key="blank", d_mlp=OPENVLA_D_MLP)
        with pytest.raises(InputError, match=r"pass d_mlp= .*11008 for OpenVLA-7B, 16384 for pi0-FAST"):
            load(key="up_10")
    with pytest.raises(InputError, match="pick one with key="):
        parse_conditions([f"steer:{path}@4"], d_mlp=OPENVLA_D_MLP)
    with pytest.raises(InputError, match="pass d_mlp="):
        parse_conditions([f"steer:{path}#up_10@4"])
    ours = NeuronSet(((1, 2),), d_mlp=8, num_layers=2, name="ours").save(tmp_path / "ours.yaml")
    with pytest.raises(InputError, match="single neuron set; key='up_10'"):
        NeuronSet.load(ours, key="up_10")
    with pytest.raises(InputError, match="does not exist"):
        NeuronSet.load(tmp_path / "nowhere.yaml", key="up_10", d_mlp=8)
    (tmp_path / "bad.yaml").write_text("up: {a: [x]}\n")
    with pytest.raises(InputError, match="flat neuron indices"):
        NeuronSet.load(tmp_path / "bad.yaml", key="up", d_mlp=8)


def test_pi0_fast_lists_with_the_widths_alone(tmp_path):
    path = tmp_path / "pi0fast.yaml"
    path.write_text(FAST_FILE)
    high = NeuronSet.load(path, key="high_cluster", d_mlp=FAST_D_MLP, num_layers=FAST_LAYERS)
    assert list(high.pairs) == sorted(divmod(i, FAST_D_MLP) for i in (256459, 260217, 40857))
    assert high.pairs == ((2, 8089), (15, 10699), (15, 14457)) and "tokens" not in high.meta
    assert high.restrict("late").pairs == ((15, 10699), (15, 14457))
    with pytest.raises(InputError, match=r"one of \['high_cluster', 'low_cluster'\]"):
        NeuronSet.load(path, d_mlp=FAST_D_MLP)
    # written back in the same list layout, next to the other entry
    out = tmp_path / "ours.yaml"
    high.save_authors(out, as_list=True)
    NeuronSet.load(path, key="low_cluster", d_mlp=FAST_D_MLP).save_authors(out, as_list=True)
    back = yaml.safe_load(out.read_text())
    assert back == {"high_cluster": [40857, 256459, 260217], "low_cluster": [5674, 253282, 257247]}


def test_a_conditions_file_refers_to_the_dictionaries(tmp_path):
    path = write_openvla_file(tmp_path)
    reference = {"file": str(path), "key": "up_20", "d_mlp": OPENVLA_D_MLP, "num_layers": OPENVLA_LAYERS}
    entries = [{"name": "baseline"},
               {"name": "up_20@a4/late", "alpha": 4.0, "layers": "late", "concept": "up_20",
                "steering": {"type": "steering", "alpha": 4.0, "layers": "late", "neurons": reference}}]
    conditions_file = tmp_path / "conditions.json"
    conditions_file.write_text(json.dumps(entries))
    baseline, steered = load_conditions(conditions_file)
    assert baseline.steering is None
    want = sorted(divmod(i, OPENVLA_D_MLP) for i in UP_20)
    assert list(steered.steering.neurons.pairs) == want
    assert len(steered.steering.resolve()) == 19  # the depth came with the reference
    # stored with the episodes as explicit pairs: the record no longer depends on the file
    again = Condition.from_dict(json.loads(json.dumps(steered.to_dict())))
    assert again.to_dict() == steered.to_dict() and "pairs" in steered.to_dict()["steering"]["neurons"]
    yaml_file = tmp_path / "conditions.yaml"
    yaml_file.write_text(yaml.safe_dump(entries))
    assert [c.to_dict() for c in parse_conditions([str(yaml_file)])] == [c.to_dict() for c in (baseline, steered)]


def test_export_round_trips_and_the_authors_loader_reads_it(tmp_path):
    path = write_openvla_file(tmp_path)
    imported = NeuronSet.load(path, key="up_20", d_mlp=OPENVLA_D_MLP)
    out = tmp_path / "ours.yaml"
    imported.save_authors(out)
    assert authors_loader(out, "up_20") == authors_loader(path, "up_20")  # indices and tokens, as theirs
    assert NeuronSet.load(out, key="up_20", d_mlp=OPENVLA_D_MLP) == imported
    # a discovered set: the lens tokens recorded by find_concept travel into the file
    scores = [{"layer": 20, "neuron": 7, "tokens": ["fast", "quick"]}, {"layer": 31, "neuron": 10000,
                                                                          "tokens": ["[action: 0.5]", "速"]}]
    fast = NeuronSet(((20, 7), (31, 10000)), d_mlp=OPENVLA_D_MLP, num_layers=OPENVLA_LAYERS, name="fast",
                     meta={"method": "knn", "scores": scores})
    fast.save_authors(out)
    assert authors_loader(out, "fast") == {20 * OPENVLA_D_MLP + 7: ["fast", "quick"],
                                           31 * OPENVLA_D_MLP + 10000: ["[action: 0.5]", "速"]}
    assert list(yaml.safe_load(out.read_text())) == ["up_20", "fast"]  # the first entry is kept
    back = NeuronSet.load(out, key="fast", d_mlp=OPENVLA_D_MLP)
    assert back.pairs == fast.pairs
    assert back.meta["tokens"] == {str(20 * OPENVLA_D_MLP + 7): ["fast", "quick"],
                                   str(31 * OPENVLA_D_MLP + 10000): ["[action: 0.5]", "速"]}
    # JSON works too (string keys, as JSON must have them)
    as_json = fast.save_authors(tmp_path / "ours.json", "fast_json")
    assert NeuronSet.load(as_json, key="fast_json", d_mlp=OPENVLA_D_MLP).pairs == fast.pairs
    # refusals: no name, no width, overwriting a file that is not a dictionaries file
    with pytest.raises(InputError, match="needs a name"):
        NeuronSet(((0, 1),), d_mlp=8).save_authors(tmp_path / "x.yaml")
    with pytest.raises(InputError, match="no d_mlp"):
        NeuronSet(((0, 1),), name="x").save_authors(tmp_path / "x.yaml")
    ours = fast.save(tmp_path / "fast_set.yaml")
    with pytest.raises(InputError, match="not a dictionaries file"):
        fast.save_authors(ours)
    assert NeuronSet.load(ours) == fast  # untouched


def test_export_with_the_tokens_of_a_lens(tmp_path):
    vla = nv.tiny("openvla", seed=0)
    lens = nv.ValueVectorLens(vla, k=4, cache_dir=False, progress=False)
    neurons = NeuronSet.for_model(vla, [(0, 3), (1, 5), (1, 9)], name="picked")
    out = export_neurons(Steering(neurons, 2.0), tmp_path / "d.yaml", lens=lens, k=3)
    got = authors_loader(out, "picked")
    assert got == {layer * vla.d_mlp + n: lens.vector_tokens(layer, n, 3) for layer, n in neurons.pairs}
    assert all(len(tokens) == 3 for tokens in got.values())
    assert NeuronSet.load(out, key="picked", d_mlp=vla.d_mlp).pairs == neurons.pairs
    with pytest.raises(InputError, match="d_mlp"):
        export_neurons(NeuronSet(((0, 1),), d_mlp=vla.d_mlp + 1, name="other"), tmp_path / "e.yaml", lens=lens)
