"""``make images`` (tools/images.py): the pure parts that decide what is mounted into a build,
where the Debian base comes from and what may not be in the operator image. The build itself
runs in ``make images`` (``.ci/run``), not in the unit suite."""

from __future__ import annotations

from tools.images import (
    Report,
    debian_source,
    forbidden_in,
    parse_pip_config,
    pip_conf_and_mounts,
    render_markdown,
)

DEB822 = """Types: deb
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
"""


def test_the_base_comes_from_the_hosts_own_release_source() -> None:
    assert debian_source({"/etc/apt/sources.list.d/debian.sources": DEB822}) == (
        "http://mirror.example/debian",
        "bookworm",
    )
    one_line = "# comment\ndeb-src http://x/debian trixie main\ndeb [arch=amd64] http://m/debian trixie main\n"
    assert debian_source({"/etc/apt/sources.list": one_line}) == ("http://m/debian", "trixie")


def test_disabled_and_security_only_sources_are_not_a_base() -> None:
    disabled = "Types: deb\nURIs: http://off/debian\nSuites: bookworm\nEnabled: no\n"
    security = "deb http://m/debian-security bookworm-security main\n"
    for sources in ({"/a.sources": disabled}, {"/b.list": security}):
        try:
            debian_source(sources)
        except ValueError:
            continue
        raise AssertionError(f"{sources} gave a base")


def test_the_hosts_pip_configuration_is_reproduced_with_its_local_paths() -> None:
    listing = (
        "global.cert='/etc/ssl/certs/ca-certificates.crt'\n"
        "global.extra-index-url='file:///opt/pypi/simple file:///opt/more/simple'\n"
        "global.find-links='/opt/old'\n"
        "global.constraint='/etc/xdg/pip/constraints.txt'\n"
        ":env:.find-links='/opt/wheels'\n"
        ":env:.default-timeout='180'\n"
        "install.index-url='https://mirror.example/simple'\n"
    )
    config = parse_pip_config(listing)
    assert config["global.find-links"] == "/opt/wheels"  # the environment wins, as for pip
    text, paths = pip_conf_and_mounts(config)
    assert "[global]\n" in text and "default-timeout = 180\n" in text
    assert "[install]\nindex-url = https://mirror.example/simple\n" in text
    assert paths == [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/xdg/pip/constraints.txt",
        "/opt/pypi",  # the index links to ../../files: the directory holding it
        "/opt/more",
        "/opt/wheels",
    ]


def test_data_plane_libraries_are_found_in_a_site_packages_listing() -> None:
    listing = [
        "kopf",
        "kopf-1.38.0.dist-info",
        "faiss",
        "faiss_cpu-1.9.0.dist-info",
        "faiss_cpu.libs",
        "torch",
        "torchgen",
        "pyarrow",
        "pyarrow-18.0.0.dist-info",
        "faissless",
        "numpy",
    ]
    assert forbidden_in(listing) == sorted(
        ["faiss", "faiss_cpu-1.9.0.dist-info", "faiss_cpu.libs", "torch", "pyarrow",
         "pyarrow-18.0.0.dist-info"]
    )
    assert forbidden_in(["kopf", "numpy", "aiohttp", "yaml"]) == []


def test_the_report_lists_every_image_and_step() -> None:
    r = Report(
        steps={"build runtime": 50.0, "start runtime": 3.0},
        sizes={"base": 200 << 20, "runtime": 600 << 20},
        checks={"runtime": "ok"},
        meta={"cores": 2, "base_cached": True},
    )
    md = render_markdown(r)
    assert "| runtime | 600 | 50 | ok |" in md and "| operator | - | - | - |" in md
    assert "| start runtime | 3.0 |" in md and "total 53 s" in md
