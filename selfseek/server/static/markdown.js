// Markdown to HTML for the model's answers, and code highlighting, in a few hundred lines.
//
// Safety: every piece of the model's text is HTML-escaped before it lands in the output; the only tags
// produced are this file's own, and a link keeps its URL only if it is http(s) or mailto. So an answer
// holding "<script>" or "<img onerror=...>" shows as text. (The page's Content-Security-Policy is a
// second wall: it runs no inline script.)
'use strict';

const SelfseekMarkdown = (() => {
  const ESC = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
  const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => ESC[c]);

  // ---- inline: code spans, links, emphasis ------------------------------------------------------------
  // Finished pieces of HTML are parked as placeholders (\u0000n\u0000) so later rules cannot touch them.
  function inline(text) {
    const parked = [];
    const park = (html) => `\u0000${parked.push(html) - 1}\u0000`;
    let s = text.replace(/(`+)([\s\S]*?[^`])\1(?!`)/g, (_, ticks, code) => park(`<code>${escapeHtml(code.trim() || code)}</code>`));
    s = escapeHtml(s);
    s = s.replace(/\[([^\]\n]+)\]\(([^)\s]+)\)/g, (whole, label, url) => {
      const raw = url.replace(/&amp;/g, '&');
      if (!/^(https?:\/\/|mailto:)/i.test(raw)) return label; // javascript:, data: ... keep only the words
      return park(`<a href="${url}" target="_blank" rel="noopener noreferrer">${emphasis(label)}</a>`);
    });
    s = s.replace(/\bhttps?:\/\/[^\s<>\u0000]*[^\s<>\u0000.,;:!?)'"&]/g, (url) =>
      park(`<a href="${url}" target="_blank" rel="noopener noreferrer">${url}</a>`));
    s = emphasis(s).replace(/\n/g, '<br>');
    while (/\u0000\d+\u0000/.test(s)) s = s.replace(/\u0000(\d+)\u0000/g, (_, n) => parked[Number(n)]); // links park code
    return s;
  }

  function emphasis(s) {
    return s
      .replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, '<strong>$1</strong>')
      .replace(/(^|[^_\w])__(?=\S)([\s\S]*?\S)__(?![_\w])/g, '$1<strong>$2</strong>') // not inside words: snake__case
      .replace(/(^|[^*\w])\*(?=\S)([^*\n]*?\S)\*(?!\*)/g, '$1<em>$2</em>')
      .replace(/(^|[^_\w])_(?=\S)([^_\n]*?\S)_(?![_\w])/g, '$1<em>$2</em>')
      .replace(/~~(?=\S)([\s\S]*?\S)~~/g, '<del>$1</del>');
  }

  // ---- blocks ---------------------------------------------------------------------------------------
  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
  const HEADING = /^ {0,3}(#{1,6})\s+(.*?)(\s+#+)?\s*$/;
  const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
  const QUOTE = /^ {0,3}> ?/;
  const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const TABLE_SEP = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

  function startsBlock(line) {
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line);
  }

  function render(src) {
    return blocks(src.replace(/\u0000/g, '').replace(/\r\n?/g, '\n').split('\n'));
  }

  function blocks(lines) {
    const out = [];
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if ((m = line.match(FENCE))) {
        const fence = m[1];
        const body = [];
        for (i++; i < lines.length && !lines[i].trim().startsWith(fence); i++) body.push(lines[i]);
        i++; // the closing fence (or the end, while a block is still streaming in)
        out.push(codeBlock(body.join('\n'), m[2]));
      } else if (!line.trim()) {
        i++;
      } else if ((m = line.match(HEADING))) {
        const n = m[1].length;
        out.push(`<h${n}>${inline(m[2])}</h${n}>`);
        i++;
      } else if (RULE.test(line)) {
        out.push('<hr>');
        i++;
      } else if (QUOTE.test(line)) {
        const inner = [];
        for (; i < lines.length && QUOTE.test(lines[i]); i++) inner.push(lines[i].replace(QUOTE, ''));
        out.push(`<blockquote>${blocks(inner)}</blockquote>`);
      } else if (ITEM.test(line)) {
        i = list(lines, i, out);
      } else if (line.includes('|') && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1])) {
        i = table(lines, i, out);
      } else {
        const para = [];
        for (; i < lines.length && lines[i].trim() && (para.length === 0 || !startsBlock(lines[i])); i++) para.push(lines[i]);
        out.push(`<p>${inline(para.join('\n'))}</p>`);
      }
    }
    return out.join('');
  }

  function list(lines, i, out) {
    const first = lines[i].match(ITEM);
    const indent = first[1].length;
    const ordered = /\d/.test(first[2]);
    const items = [];
    let content = indent + first[2].length + 1; // where an item's text starts: continuation lines align there
    while (i < lines.length) {
      const line = lines[i];
      const m = line.match(ITEM);
      const lead = line.length - line.trimStart().length;
      if (m && m[1].length === indent && /\d/.test(m[2]) === ordered) {
        items.push([m[3]]);
        content = indent + m[2].length + 1;
      } else if (line.trim() && lead > indent) {
        items[items.length - 1].push(line.slice(Math.min(lead, content)));
      } else if (!line.trim() && i + 1 < lines.length && (ITEM.test(lines[i + 1]) || /^\s+\S/.test(lines[i + 1]))
                 && lines[i + 1].length - lines[i + 1].trimStart().length >= indent) {
        items[items.length - 1].push('');
      } else {
        break;
      }
      i++;
    }
    const tag = ordered ? 'ol' : 'ul';
    const start = ordered && parseInt(first[2], 10) !== 1 ? ` start="${parseInt(first[2], 10)}"` : '';
    const html = items.map((it) => `<li>${it.length === 1 ? inline(it[0]) : blocks(it)}</li>`).join('');
    out.push(`<${tag}${start}>${html}</${tag}>`);
    return i;
  }

  function table(lines, i, out) {
    const cells = (line) => line.trim().replace(/^\|/, '').replace(/\|$/, '').split('|').map((c) => c.trim());
    const align = cells(lines[i + 1]).map((c) => (c.endsWith(':') ? (c.startsWith(':') ? 'center' : 'right') : ''));
    const row = (line, tag) => `<tr>${cells(line).map((c, k) =>
      `<${tag}${align[k] ? ` class="align-${align[k]}"` : ''}>${inline(c)}</${tag}>`).join('')}</tr>`; // no style=: CSP
    let html = `<thead>${row(lines[i], 'th')}</thead><tbody>`;
    for (i += 2; i < lines.length && lines[i].includes('|') && lines[i].trim(); i++) html += row(lines[i], 'td');
    out.push(`<div class="table-wrap"><table>${html}</tbody></table></div>`);
    return i;
  }

  function codeBlock(code, lang) {
    const name = lang ? escapeHtml(lang) : 'text';
    return `<div class="code-block"><div class="code-head"><span class="code-lang">${name}</span>`
      + '<button type="button" class="copy-code">Copy</button></div>'
      + `<pre><code>${highlight(code, lang)}</code></pre></div>`;
  }

  // ---- highlighting -----------------------------------------------------------------------------------
  // One tokenizing regex per family of languages: comments, strings, numbers, words (keywords, builtins,
  // and names followed by "(" as calls). Everything between tokens is escaped as plain text.
  const words = (s) => new Set(s.split(' '));
  const C_LIKE = 'if else for while do switch case default break continue return goto sizeof struct union enum '
    + 'typedef static const extern volatile inline void char short int long float double signed unsigned bool '
    + 'true false NULL nullptr class public private protected virtual override template typename namespace using '
    + 'new delete this try catch throw auto constexpr final';
  const LANGS = {
    python: { comment: /#.*/, string: /[rbfuRBFU]{0,2}("""[\s\S]*?"""|'''[\s\S]*?'''|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*')/,
      keywords: words('and as assert async await break class continue def del elif else except finally for from '
        + 'global if import in is lambda nonlocal not or pass raise return try while with yield match case'),
      literals: words('True False None self cls') },
    js: { comment: /\/\/.*|\/\*[\s\S]*?\*\//, string: /`(?:\\[\s\S]|[^`\\])*`|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'/,
      keywords: words('break case catch class const continue debugger default delete do else export extends '
        + 'finally for function if import in instanceof let new return super switch throw try typeof var void '
        + 'while with yield async await of static get set from as interface type enum implements readonly '
        + 'private public protected declare namespace abstract'),
      literals: words('true false null undefined this NaN Infinity') },
    c: { comment: /\/\/.*|\/\*[\s\S]*?\*\/|^\s*#\s*\w+/m, string: /"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'/,
      keywords: words(C_LIKE), literals: words('true false NULL nullptr this') },
    java: { comment: /\/\/.*|\/\*[\s\S]*?\*\//, string: /"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'/,
      keywords: words(`${C_LIKE} package import extends implements interface abstract synchronized throws `
        + 'instanceof var val fun object when is in out data sealed companion'),
      literals: words('true false null this super') },
    go: { comment: /\/\/.*|\/\*[\s\S]*?\*\//, string: /`[^`]*`|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'/,
      keywords: words('break case chan const continue default defer else fallthrough for func go goto if '
        + 'import interface map package range return select struct switch type var'),
      literals: words('true false nil iota') },
    rust: { comment: /\/\/.*|\/\*[\s\S]*?\*\//, string: /r#*"[\s\S]*?"#*|b?"(?:\\.|[^"\\])*"|b?'(?:\\.|[^'\\\n])'/,
      keywords: words('as async await break const continue crate dyn else enum extern fn for if impl in let loop '
        + 'match mod move mut pub ref return static struct trait type unsafe use where while'),
      literals: words('true false self Self None Some Ok Err') },
    shell: { comment: /(^|\s)#.*/, string: /"(?:\\.|[^"\\])*"|'[^']*'/,
      keywords: words('if then else elif fi for while until do done case esac in function return export local '
        + 'readonly set unset echo cd source exit sudo'),
      literals: words('true false') },
    sql: { comment: /--.*|\/\*[\s\S]*?\*\//, string: /'(?:''|[^'])*'|"(?:[^"])*"/, caseless: true,
      keywords: words('select from where and or not insert into values update set delete create table drop '
        + 'alter index join left right inner outer on group by order having limit offset as distinct union all '
        + 'primary key foreign references default null is in like between case when then else end exists'),
      literals: words('true false null') },
    json: { comment: null, string: /"(?:\\.|[^"\\\n])*"/, keywords: words(''), literals: words('true false null') },
    css: { comment: /\/\*[\s\S]*?\*\//, string: /"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'/, keywords: words(''),
      literals: words('important inherit initial none auto') },
    html: null, // tags, attributes and comments: see highlightMarkup
  };
  const ALIASES = { py: 'python', python3: 'python', javascript: 'js', jsx: 'js', ts: 'js', typescript: 'js', tsx: 'js',
    mjs: 'js', node: 'js', cpp: 'c', 'c++': 'c', cc: 'c', h: 'c', hpp: 'c', cxx: 'c', cs: 'java', csharp: 'java',
    kotlin: 'java', kt: 'java', scala: 'java', swift: 'java', golang: 'go', rs: 'rust', sh: 'shell', bash: 'shell',
    zsh: 'shell', console: 'shell', shellscript: 'shell', ps1: 'shell', yaml: 'shell', yml: 'shell', toml: 'shell',
    ini: 'shell', dockerfile: 'shell', makefile: 'shell', xml: 'html', svg: 'html', vue: 'html', jsonc: 'json',
    scss: 'css', less: 'css', postgres: 'sql', mysql: 'sql', sqlite: 'sql' };

  const span = (cls, text) => `<span class="tok-${cls}">${escapeHtml(text)}</span>`;

  function highlight(code, lang) {
    const key = (lang || '').toLowerCase();
    const name = ALIASES[key] || key;
    if (name === 'html') return highlightMarkup(code);
    const spec = LANGS[name];
    if (!spec) return escapeHtml(code);
    const parts = [spec.comment && `(?<comment>${spec.comment.source})`, `(?<string>${spec.string.source})`,
      '(?<number>\\b(?:0[xX][\\da-fA-F_]+|\\d[\\d_]*(?:\\.\\d+)?(?:[eE][+-]?\\d+)?)\\b)',
      '(?<word>[A-Za-z_$][\\w$]*)(?<call>\\s*\\()?'].filter(Boolean);
    const re = new RegExp(parts.join('|'), 'gm');
    let html = '';
    let last = 0;
    for (const m of code.matchAll(re)) {
      if (!m[0]) continue;
      html += escapeHtml(code.slice(last, m.index));
      const g = m.groups;
      if (g.comment !== undefined) {
        // shell's "#" comment may start with the whitespace before it
        const lead = g.comment.length - g.comment.trimStart().length;
        html += escapeHtml(g.comment.slice(0, lead)) + span('comment', g.comment.slice(lead));
      } else if (g.string !== undefined) html += span('string', g.string);
      else if (g.number !== undefined) html += span('number', g.number);
      else {
        const w = spec.caseless ? g.word.toLowerCase() : g.word;
        const cls = spec.keywords.has(w) ? 'keyword' : spec.literals.has(w) ? 'literal' : g.call ? 'function' : null;
        html += cls ? span(cls, g.word) : escapeHtml(g.word);
        if (g.call) html += escapeHtml(g.call);
      }
      last = m.index + m[0].length;
    }
    return html + escapeHtml(code.slice(last));
  }

  function highlightMarkup(code) {
    const re = /(?<comment><!--[\s\S]*?-->)|(?<tag><\/?[\w:-]+)|(?<attr>[\w:-]+)(?==)|(?<string>"[^"]*"|'[^']*')/g;
    let html = '';
    let last = 0;
    let inTag = false;
    for (const m of code.matchAll(re)) {
      const between = code.slice(last, m.index);
      if (between.includes('>')) inTag = false;
      html += escapeHtml(between);
      const g = m.groups;
      if (g.comment !== undefined) html += span('comment', g.comment);
      else if (g.tag !== undefined) { html += span('keyword', g.tag); inTag = true; }
      else if (inTag && g.attr !== undefined) html += span('function', g.attr);
      else if (inTag && g.string !== undefined) html += span('string', g.string);
      else html += escapeHtml(m[0]);
      last = m.index + m[0].length;
    }
    return html + escapeHtml(code.slice(last));
  }

  return { render, inline, highlight, escapeHtml };
})();

if (typeof module !== 'undefined') module.exports = SelfseekMarkdown; // for tests under Node, if present
