"""``moesaic data``: the one command that installs every Debian package the data and tests read,
run against stand-in ``dpkg-query`` and ``apt-get`` programs that record what they were asked."""

from __future__ import annotations

import os
import stat

import pytest

from moesaic.cli.data import main
from moesaic.data import corpora
from moesaic.data.debian import DATA_PACKAGES, TEST_PACKAGES, install_line


def _fake(bin_dir, name, body):
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def debian(tmp_path, monkeypatch):
    """A PATH whose dpkg-query reports the packages listed in ``tmp_path/installed`` and whose
    apt-get appends its arguments to ``tmp_path/apt.log`` and installs what it is asked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "installed").write_text("bible-kjv\n")
    _fake(
        bin_dir,
        "dpkg-query",
        f'grep -qx "$3" {tmp_path}/installed && printf "install ok installed" && exit 0\nexit 1\n',
    )
    _fake(
        bin_dir,
        "apt-get",
        f'echo "$@" >> {tmp_path}/apt.log\n'
        f'if [ "$1" = install ]; then shift 3; for p in "$@"; do echo $p >> {tmp_path}/installed;'
        " done; fi\n",
    )
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    return tmp_path


def test_status_lists_every_package_and_what_needs_it(debian, capsys):
    assert main(["status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(TEST_PACKAGES)
    assert lines[0].split()[:2] == ["bible-kjv", "installed"]
    assert all(line.split()[1] == "missing" for line in lines[1:])


def test_print_gives_the_apt_line_for_the_missing_packages_only(debian, capsys):
    assert main(["install", "--print"]) == 0
    want = install_line([p for p in TEST_PACKAGES if p != "bible-kjv"])
    assert capsys.readouterr().out.strip() == want


def test_install_updates_then_installs_the_missing_ones_and_checks_them(debian, capsys):
    assert main(["install", "--yes"]) == 0
    log = (debian / "apt.log").read_text().splitlines()
    assert log[0] == "update"
    assert log[1].split()[:3] == ["install", "-y", "--no-install-recommends"]
    assert log[1].split()[3:] == [p for p in TEST_PACKAGES if p != "bible-kjv"]
    assert "installed 10 Debian packages" in capsys.readouterr().out
    assert main(["install", "--yes"]) == 0  # nothing left to do: apt-get is not called again
    assert len((debian / "apt.log").read_text().splitlines()) == 2


def test_without_yes_and_no_terminal_it_refuses_with_the_line(debian, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    with pytest.raises(SystemExit) as exit:
        main(["install"])
    assert exit.value.code == 2
    assert "pass --yes: apt-get install -y" in capsys.readouterr().err


def test_every_corpus_package_is_in_the_registry():
    assert set(corpora._INSTALLED) <= set(DATA_PACKAGES)


def test_a_test_whose_data_is_missing_fails_with_the_install_line(monkeypatch):
    from moesaic.data import debian
    from tests.cases import require_debian

    monkeypatch.setattr(debian, "missing", lambda packages: [p for p in packages if p != "x"])
    with pytest.raises(pytest.fail.Exception) as failed:
        require_debian("x", "bible-kjv")
    assert "needs the Debian packages bible-kjv: run `moesaic data install --yes`" in str(
        failed.value
    )
    assert install_line(["bible-kjv"]) in str(failed.value)
    require_debian("x")  # present: nothing happens
