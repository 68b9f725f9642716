"""Config.shares and the 9P limits: parsing (TOML tables, NAME=PATH[:ro][:owners]
strings, on every command line that takes --share) and validation."""

from __future__ import annotations

import pytest

from netkit.cli import build_config, switch_parser
from netkit.config import Config, ConfigError, Share, parse_share


def test_shares_from_toml_tables_and_strings():
    c = Config.from_mapping({"shares": [{"name": "src", "path": "/home/me/src", "read_only": True},
                                        "data=/srv/data", "docs=/srv/docs:ro"],
                             "files-msize-max": "65536", "files_max_fids": 100, "files_max_outstanding": 4})
    assert c.shares == (Share("src", "/home/me/src", True), Share("data", "/srv/data", False),
                        Share("docs", "/srv/docs", True))
    assert c.shares_by_name()["data"].path == "/srv/data"
    assert (c.files_msize_max, c.files_max_fids, c.files_max_outstanding) == (65536, 100, 4)


@pytest.mark.parametrize("text,share", [
    ("a=/p", Share("a", "/p")),
    ("a=/p:ro", Share("a", "/p", read_only=True)),
    ("a=/p:owners", Share("a", "/p", owners=True)),
    ("a=/p:ro:owners", Share("a", "/p", read_only=True, owners=True)),
    ("a=/p:owners:ro", Share("a", "/p", read_only=True, owners=True)),
    ("a=/with:colon", Share("a", "/with:colon")),
    ("a=/with:colon:ro", Share("a", "/with:colon", read_only=True)),
    ("a=/p:ro:ro", Share("a", "/p:ro", read_only=True)),  # an option once; the rest is path
    ("a=/p:rw", Share("a", "/p:rw")),
])
def test_share_options(text, share):
    assert parse_share(text) == share
    assert Config.from_mapping({"shares": [text]}).shares == (share,)


def test_share_options_from_toml(tmp_path):
    path = tmp_path / "netkit.toml"
    path.write_text('[[shares]]\nname = "src"\npath = "/srv/src"\nowners = true\n'
                    '[[shares]]\nname = "docs"\npath = "/srv/docs"\nread_only = true\n')
    assert Config.from_toml(str(path)).shares == (Share("src", "/srv/src", owners=True),
                                                  Share("docs", "/srv/docs", read_only=True))


@pytest.mark.parametrize("table", [
    {"name": "a", "path": "/p", "owners": "false"},  # a string is not a boolean
    {"name": "a", "path": "/p", "owner": True},      # a misspelt option is not ignored
])
def test_bad_share_tables_rejected(table):
    with pytest.raises(ConfigError, match="shares"):
        Config.from_mapping({"shares": [table]})


def test_switch_share_flag():
    args = switch_parser().parse_args(["--share", "a=/p:owners", "--share", "b=/q:ro"])
    assert build_config(args).shares == (Share("a", "/p", owners=True), Share("b", "/q", read_only=True))


def test_defaults():
    c = Config()
    assert c.shares == () and c.shares_by_name() == {}
    assert c.files_msize_max == 1 << 20


@pytest.mark.parametrize("shares", [
    (Share("", "/x"),), (Share("a/b", "/x"),), (Share("a", "relative"),), (Share("a", ""),),
    (Share("a", "/x"), Share("a", "/y")),
])
def test_bad_shares_rejected(shares):
    with pytest.raises(ConfigError, match="shares"):
        Config(shares=shares)


def test_bad_share_string_rejected():
    with pytest.raises(ConfigError, match="shares"):
        Config.from_mapping({"shares": ["no-equals-sign"]})


@pytest.mark.parametrize("key,value", [("files_msize_max", 100), ("files_msize_max", 1 << 30),
                                       ("files_max_fids", 0), ("files_max_outstanding", 0)])
def test_bad_limits_rejected(key, value):
    with pytest.raises(ConfigError, match=key):
        Config.from_mapping({key: value})
