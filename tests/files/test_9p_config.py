"""Config.shares and the 9P limits: parsing (TOML tables, NAME=PATH[:ro] strings) and
validation."""

from __future__ import annotations

import pytest

from netkit.config import Config, ConfigError, Share


def test_shares_from_toml_tables_and_strings():
    c = Config.from_mapping({"shares": [{"name": "src", "path": "/home/me/src", "read_only": True},
                                        "data=/srv/data", "docs=/srv/docs:ro"],
                             "files-msize-max": "65536", "files_max_fids": 100, "files_max_outstanding": 4})
    assert c.shares == (Share("src", "/home/me/src", True), Share("data", "/srv/data", False),
                        Share("docs", "/srv/docs", True))
    assert c.shares_by_name()["data"].path == "/srv/data"
    assert (c.files_msize_max, c.files_max_fids, c.files_max_outstanding) == (65536, 100, 4)


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
