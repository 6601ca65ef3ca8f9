"""``celo2 meta-train --set variant.FIELD=VALUE`` and ``celo2 theta show`` of a variant theta."""

from __future__ import annotations

import json

import pytest

import celo2
from celo2.cli.main import main
from celo2.rule.variant import RuleVariant


def test_print_config_shows_the_variant(capsys):
    code = main(["meta-train", "--preset", "smoke", "--print-config", "--set", "variant.hidden_width=4",
                 "--set", "variant.feature_groups=g,m,v", "--set", "variant.outputs=direction+magnitude"])
    out, err = capsys.readouterr()
    assert code == 0, err
    variant = json.loads(out)["variant"]
    assert variant["hidden_width"] == 4 and variant["feature_groups"] == ["g", "m", "v"]
    assert variant["outputs"] == "direction+magnitude" and variant["rms_decay"] == 0.95


@pytest.mark.parametrize("setting, needle", [
    ("variant.hidden_width=0", "hidden_width=0: must be a positive integer"),
    ("variant.depth=3", "unknown field 'depth'"),
    ("variant.feature_groups=g,nope", "unknown group 'nope'"),
    ("variant.output_norm=l2", "output_norm='l2': choose one of rms, none"),
    ("variant={", "malformed rule variant record"),
])
def test_bad_variant_settings_are_one_line_errors(capsys, setting, needle):
    code = main(["meta-train", "--preset", "smoke", "--print-config", "--set", setting])
    _, err = capsys.readouterr()
    assert code == 2 and needle in err and "Traceback" not in err


def test_theta_show_names_the_variant(capsys, tmp_path):
    variant = RuleVariant(hidden_width=4, hidden_layers=3)
    path = celo2.save_theta(celo2.Theta.init(0, variant), tmp_path / "v.state")
    assert main(["theta", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "variant:    hidden_width=4, hidden_layers=3" in out and "w3 " in out
    assert main(["theta", "convert", str(path), str(tmp_path / "v.pt")]) == 0
    assert celo2.load_theta(tmp_path / "v.pt").variant == variant
