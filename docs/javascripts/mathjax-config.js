// MathJax settings for pymdownx.arithmatex (generic mode): typeset only what arithmatex
// marked, \( ... \) inline and \[ ... \] displayed. Loaded before the vendored MathJax.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
  svg: { fontCache: "global" },
};
