import sys

import pytest

from datahall.core.topologies import build
from datahall.core.topologies.wan import WAN_CATALOG, wan
from datahall.core.topology import TopologyError


@pytest.mark.parametrize(
    ("name", "nodes", "links"),
    [("abilene", 12, 15), ("geant", 22, 36), ("germany50", 50, 88), ("tatanld", 143, 181)],
)
def test_sizes_match_topohub(name, nodes, links):
    G = wan(name)
    assert G.number_of_nodes() == nodes
    assert G.number_of_edges() == 2 * links  # each undirected link is two arcs
    assert all(G.has_edge(v, u) for u, v in G.edges)
    assert {k for _, k in G.nodes(data="kind")} == {"router"}


def test_uniform_capacity_and_names():
    G = wan("abilene", capacity=40)
    assert {c for _, _, c in G.edges(data="capacity")} == {40}
    assert "ATLAng" in G and G.has_edge("ATLAng", "HSTNng")
    assert G.graph["source"] == "topohub:sndlib/abilene"
    # latency from the link length (132.4 km at 5 us/km)
    assert G["ATLAM5"]["ATLAng"]["latency"] == pytest.approx(132.4 * 5e-6)
    assert {c for _, _, c in wan("abilene", capacity="800Gb/s").edges(data="capacity")} == {100}


def test_passthrough_key_and_generator_registry():
    G = wan("sndlib/polska")
    assert (G.number_of_nodes(), G.number_of_edges()) == (12, 36)
    assert build("wan", name="geant").number_of_nodes() == 22
    assert WAN_CATALOG["tatanld"] == "topozoo/TataNld"


def test_unnamed_nodes_fall_back_to_their_ids():
    G = wan("backbone/africa")  # topohub has no (unique) names here
    assert G.number_of_nodes() == 403 and all(n.isdigit() for n in G)


@pytest.mark.parametrize("name", ["cogentco", "topozoo/Cogentco", "b4", "nope/nothing"])
def test_unknown_names_list_the_choices(name):
    with pytest.raises(
        TopologyError, match="choose one of abilene, geant.*no Cogentco, B4 or SWAN"
    ):
        wan(name)


def test_missing_topohub_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "topohub", None)
    with pytest.raises(TopologyError, match="pip install topohub"):
        wan("abilene")
