"""The documentation builds with ``mkdocs build --strict`` and its pages render.

Static checks read the built HTML: no LaTeX outside the spans that MathJax typesets, and
every page with formulas loads the vendored MathJax. The rendered checks open key pages in
a real headless Chromium and read the DOM after MathJax ran: every formula typeset, no
MathJax error, no raw ``$$`` / ``\\(`` / ``\\[`` left visible. A test of the checker shows
it catching a page that renders broken.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[docs]')")

ROOT = Path(__file__).resolve().parent.parent
#: Pages opened in the browser: every page with formulas, and the newcomer's first pages.
RENDERED_PAGES = ("math", "quickstart", "tuning", "gpu", "sharded", "index")
MATHJAX = "javascripts/mathjax/tex-svg.js"
#: What raw LaTeX looks like when it is left untypeset.
RAW_LATEX = re.compile(r"\$\$|\\\(|\\\)|\\\[|\\\]|\\frac|\\sum|\\begin\{")
#: Elements whose text is not prose: code, scripts, and what MathJax produced.
SKIPPED = {"code", "pre", "script", "style", "svg", "mjx-container", "math", "textarea"}
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source"}


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class PageReport(HTMLParser):
    """What a page shows: prose text outside code and formulas, its formulas (``.arithmatex``
    elements) and how many of them hold MathJax output, and MathJax's error nodes."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool, bool]] = []  # (tag, skipped, inside a formula)
        self.prose: list[str] = []
        self.formulas = 0
        self.typeset = 0
        self.errors = 0
        self.scripts: list[str] = []
        self._counted: list[bool] = []  # per open formula: typeset output seen

    def handle_starttag(self, tag, attrs) -> None:
        attributes = dict(attrs)
        if tag == "script" and attributes.get("src"):
            self.scripts.append(attributes["src"])
        node = attributes.get("data-mml-node")
        if (
            node == "merror"  # a TeX syntax error
            or "data-mjx-error" in attributes
            or (node == "mtext" and attributes.get("fill") == "red")  # an undefined macro
        ):
            self.errors += 1
        if tag == "mjx-container" and self._counted and not self._counted[-1]:
            self._counted[-1] = True
            self.typeset += 1
        if tag in VOID:
            return
        formula = "arithmatex" in (attributes.get("class") or "").split()
        if formula:
            self.formulas += 1
            self._counted.append(False)
        skipped = tag in SKIPPED or (self.stack[-1][1] if self.stack else False)
        self.stack.append((tag, skipped, formula))

    def handle_endtag(self, tag) -> None:
        if tag in VOID:
            return
        while self.stack:
            open_tag, _, formula = self.stack.pop()
            if formula:
                self._counted.pop()
            if open_tag == tag:
                break

    def handle_data(self, data) -> None:
        inside_formula = any(formula for _, _, formula in self.stack)
        if not (self.stack and self.stack[-1][1]) and not inside_formula:
            self.prose.append(data)

    @property
    def text(self) -> str:
        return " ".join(self.prose)


def report(html: str) -> PageReport:
    parser = PageReport()
    parser.feed(html)
    parser.close()
    return parser


def render(chromium: str, url: str, profile: Path) -> tuple[str, str]:
    """The DOM of ``url`` after its scripts ran, and Chromium's log (console messages)."""
    result = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=15000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout, result.stderr


def rendered_problems(dom: str, log: str) -> list[str]:
    """Why a rendered page is broken; empty if it is not."""
    page = report(dom)
    problems = []
    if page.typeset < page.formulas:
        problems.append(f"{page.formulas - page.typeset} of {page.formulas} formulas not typeset")
    if page.errors:
        problems.append(f"{page.errors} MathJax error node(s)")
    raw = sorted(set(RAW_LATEX.findall(page.text)))
    if raw:
        problems.append(f"raw LaTeX visible: {raw}")
    uncaught = [line for line in log.splitlines() if "Uncaught" in line]
    if uncaught:
        problems.append(f"script errors: {uncaught[:3]}")
    return problems


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip(
            "Chromium is not installed (apt-get install chromium): the rendered-page checks "
            "need a headless browser"
        )
    return path


def test_no_latex_outside_formulas_and_mathjax_loaded(site):
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 10
    with_formulas = 0
    for path in pages:
        if path.name == "404.html":
            continue
        page = report(path.read_text(encoding="utf-8"))
        raw = sorted(set(RAW_LATEX.findall(page.text)))
        assert not raw, f"{path.relative_to(site)}: LaTeX outside formulas: {raw}"
        if page.formulas:
            with_formulas += 1
            assert any(src.endswith(MATHJAX) for src in page.scripts), path
    assert with_formulas >= 2  # math.md and tuning.md at least
    assert (site / MATHJAX).stat().st_size > 1_000_000  # the vendored bundle, not a stub


def test_nav_has_the_newcomer_pages(site):
    index = (site / "index.html").read_text(encoding="utf-8")
    for page in ("tuning/", "gpu/", "math/", "quickstart/"):
        assert f'href="{page}"' in index, page


@pytest.mark.parametrize("page", RENDERED_PAGES)
def test_page_renders_in_a_browser(page, site, chromium, tmp_path):
    path = site / "index.html" if page == "index" else site / page / "index.html"
    dom, log = render(chromium, path.as_uri(), tmp_path / "profile")
    static = report(path.read_text(encoding="utf-8"))
    assert not rendered_problems(dom, log), rendered_problems(dom, log)
    assert report(dom).typeset == static.formulas
    if page in ("math", "tuning"):
        assert static.formulas > 10


def test_the_check_catches_a_broken_page(site, chromium, tmp_path):
    """Pages with raw LaTeX outside the formula spans, an undefined macro, a TeX syntax error
    or no MathJax at all fail."""
    broken = site / "broken.html"
    broken.write_text(
        "<html><body><p>Raw: $$A = \\frac{1}{R}$$ and \\(x\\)</p>"
        '<p><span class="arithmatex">\\(\\undefinedmacro{x}\\)</span>'
        '<span class="arithmatex">\\(\\frac{1}{\\)</span></p>'
        '<script src="javascripts/mathjax-config.js"></script>'
        f'<script src="{MATHJAX}"></script></body></html>',
        encoding="utf-8",
    )
    dom, log = render(chromium, broken.as_uri(), tmp_path / "profile")
    problems = rendered_problems(dom, log)
    assert any("raw LaTeX" in p for p in problems), problems
    assert any("MathJax error" in p for p in problems), problems  # the undefined macro
    assert any("not typeset" in p for p in problems), problems  # the syntax error
    without_mathjax = site / "unrendered.html"
    without_mathjax.write_text(
        '<html><body><p><span class="arithmatex">\\(x^2\\)</span></p></body></html>',
        encoding="utf-8",
    )
    dom, log = render(chromium, without_mathjax.as_uri(), tmp_path / "profile2")
    assert any("not typeset" in p for p in rendered_problems(dom, log))
