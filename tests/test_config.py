"""Config from a mapping (TOML, CLI overrides): numbers and flags take their field's type."""

import dataclasses

import pytest

from netkit import Config, ConfigError


def test_every_scalar_field_takes_its_declared_type_from_a_mapping():
    numeric = {f.name: f.type for f in dataclasses.fields(Config) if f.type in ("int", "float")}
    defaults = Config()
    # Strings (as a command line gives them) become the field's own type.
    config = Config.from_mapping({name: str(getattr(defaults, name)) for name in numeric})
    for name, kind in numeric.items():
        value = getattr(config, name)
        assert type(value).__name__ == kind and value == getattr(defaults, name), name


def test_limits_from_toml_and_bad_values_name_the_setting(tmp_path):
    path = tmp_path / "netkit.toml"
    path.write_text("guest_buffer_bytes = 1048576\nhttp_proxy_header_timeout = 5\nhost_loopback = false\n"
                    "udp_max_flows_per_guest = 64\ndecline_max_pool_fraction = 0.5\n")
    config = Config.from_toml(str(path))
    assert config.guest_buffer_bytes == 1048576
    assert config.http_proxy_header_timeout == 5.0 and isinstance(config.http_proxy_header_timeout, float)
    assert config.host_loopback is False
    assert config.udp_max_flows_per_guest == 64 and config.decline_max_pool_fraction == 0.5
    with pytest.raises(ConfigError, match="udp_max_flows_per_guest"):
        Config.from_mapping({"udp_max_flows_per_guest": "many"})
