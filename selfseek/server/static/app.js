// The chat page: conversations in localStorage, answers streamed from the server's /v1/chat/completions.
// No framework: the DOM is rebuilt when a conversation changes, and only the streaming answer is touched
// while tokens arrive. All model text goes through SelfseekMarkdown (escaped) or textContent.
'use strict';

(() => {
  const md = SelfseekMarkdown;
  const $ = (id) => document.getElementById(id);
  const STORE = 'selfseek.conversations';
  const SETTINGS = 'selfseek.settings';

  const el = {
    sidebar: $('sidebar'), scrim: $('scrim'), toggle: $('toggle-sidebar'), list: $('conversations'),
    newChat: $('new-chat'), model: $('model'), settingsButton: $('settings-button'), settings: $('settings'),
    temperature: $('temperature'), maxTokens: $('max-tokens'), system: $('system-prompt'), apiKey: $('api-key'),
    apiKeyLabel: $('api-key-label'), notice: $('notice'), messages: $('messages'), empty: $('empty'),
    composer: $('composer'), input: $('input'), send: $('send'), stop: $('stop'),
  };

  // ---- storage ----------------------------------------------------------------------------------------
  function load(key, fallback) {
    try {
      const v = JSON.parse(localStorage.getItem(key));
      return v ?? fallback;
    } catch {
      return fallback;
    }
  }

  const state = {
    conversations: load(STORE, []), // newest first: {id, title, updated, messages: [...]}
    currentId: null,
    settings: { model: '', temperature: '', maxTokens: '', system: '', apiKey: '', ...load(SETTINGS, {}) },
    streaming: null, // {controller, conversation, message}
  };

  function saveConversations() {
    try {
      localStorage.setItem(STORE, JSON.stringify(state.conversations));
    } catch (e) {
      showNotice(`Could not save the conversation in this browser: ${e.message}`);
    }
  }

  const saveSettings = () => localStorage.setItem(SETTINGS, JSON.stringify(state.settings));
  const current = () => state.conversations.find((c) => c.id === state.currentId) || null;
  const newId = () => (crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random()}`);

  // ---- server -----------------------------------------------------------------------------------------
  function headers() {
    const h = { 'Content-Type': 'application/json' };
    if (state.settings.apiKey) h.Authorization = `Bearer ${state.settings.apiKey}`;
    return h;
  }

  class ServerError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function errorFrom(resp) {
    const text = await resp.text();
    let message = text || resp.statusText;
    try {
      const body = JSON.parse(text);
      const err = body.error ?? body.detail ?? body;
      message = typeof err === 'string' ? err : err.message || JSON.stringify(err);
    } catch { /* not JSON: the text itself */ }
    return new ServerError(resp.status, message);
  }

  function needKey(err) {
    if (err.status !== 401) return;
    openSettings(true);
    el.apiKeyLabel.classList.add('attention');
    el.apiKey.focus();
    showNotice(state.settings.apiKey
      ? 'The server did not accept this API key. Enter the right one in Settings.'
      : 'This server needs an API key: enter it in Settings.');
  }

  async function loadModels() {
    try {
      const resp = await fetch('v1/models', { headers: headers() });
      if (!resp.ok) throw await errorFrom(resp);
      const names = (await resp.json()).data.map((m) => m.id);
      el.model.replaceChildren(...names.map((n) => new Option(n, n)));
      el.model.value = names.includes(state.settings.model) ? state.settings.model : names[0];
      hideNotice();
    } catch (err) {
      el.model.replaceChildren(new Option('(no model list)', ''));
      if (err.status === 401) needKey(err);
      else showNotice(`Could not list the models: ${err.message}`);
    }
  }

  // ---- sending ----------------------------------------------------------------------------------------
  function requestMessages(conv) {
    const out = [];
    if (state.settings.system.trim()) out.push({ role: 'system', content: state.settings.system });
    for (const m of conv.messages) {
      if (m.role === 'user') out.push({ role: 'user', content: m.content });
      else if (m.role === 'assistant' && !m.error && m.content) out.push({ role: 'assistant', content: m.content });
    }
    return out;
  }

  async function generate(conv) {
    const answer = { role: 'assistant', content: '', reasoning: '', model: el.model.value, stats: null };
    conv.messages.push(answer);
    conv.updated = Date.now();
    saveConversations();
    renderAll();
    const controller = new AbortController();
    state.streaming = { controller, conversation: conv, message: answer };
    setStreaming(true);
    const body = { model: el.model.value, messages: requestMessages(conv), stream: true,
      stream_options: { include_usage: true } };
    const t = parseFloat(state.settings.temperature);
    const n = parseInt(state.settings.maxTokens, 10);
    if (!Number.isNaN(t)) body.temperature = t;
    if (!Number.isNaN(n)) body.max_tokens = n;
    const started = performance.now();
    let first = null;
    let usage = null;
    let finished = null; // the finish_reason, once the last chunk came
    try {
      const resp = await fetch('v1/chat/completions', { method: 'POST', headers: headers(), body: JSON.stringify(body),
        signal: controller.signal });
      if (!resp.ok) throw await errorFrom(resp);
      for await (const event of sseEvents(resp.body)) {
        if (event.error) throw new ServerError(500, event.error.message || JSON.stringify(event.error));
        if (event.usage) usage = event.usage;
        if (event.choices?.[0]?.finish_reason) finished = event.choices[0].finish_reason;
        const delta = event.choices?.[0]?.delta;
        if (!delta) continue;
        if (delta.reasoning_content || delta.content) first ??= performance.now();
        answer.reasoning += delta.reasoning_content || '';
        answer.content += delta.content || '';
        scheduleAnswerUpdate();
      }
      answer.stats = stats(usage, started, first, performance.now());
      if (!finished) answer.error = 'The connection closed before the answer was finished.';
      else if (finished === 'insufficient_system_resource') answer.error = 'The server ran out of memory for this answer.';
    } catch (err) {
      if (err.name === 'AbortError') {
        answer.stopped = true;
      } else if (err instanceof ServerError) {
        answer.error = `Error ${err.status}: ${err.message}`;
        if (err.status === 401) needKey(err);
      } else {
        answer.error = err instanceof TypeError ? `Cannot reach the server: ${err.message}` : `Error: ${err.message}`;
      }
    } finally {
      state.streaming = null;
      setStreaming(false);
      conv.updated = Date.now();
      saveConversations();
      renderAll();
    }
  }

  // Server-sent events from a fetch body: each "data:" payload parsed as JSON, until [DONE].
  async function* sseEvents(stream) {
    const reader = stream.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, '\n');
        let cut;
        while ((cut = buffer.indexOf('\n\n')) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const data = block.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trimStart()).join('\n');
          if (!data) continue; // a keep-alive comment
          if (data === '[DONE]') return;
          yield JSON.parse(data);
        }
      }
    } finally {
      reader.releaseLock();
    }
  }

  function stats(usage, started, first, end) {
    if (!usage) return null;
    const n = usage.completion_tokens;
    const seconds = first === null ? 0 : (end - first) / 1000;
    return {
      completionTokens: n,
      promptTokens: usage.prompt_tokens,
      cacheHit: usage.prompt_cache_hit_tokens ?? usage.prompt_tokens_details?.cached_tokens ?? 0,
      tokensPerSecond: n > 1 && seconds > 0 ? (n - 1) / seconds : null, // the first token waited for the prompt
      firstTokenSeconds: first === null ? null : (first - started) / 1000,
    };
  }

  function send(text) {
    if (state.streaming || !text.trim()) return;
    let conv = current();
    if (!conv) {
      conv = { id: newId(), title: text.trim().slice(0, 60), updated: Date.now(), messages: [] };
      state.conversations.unshift(conv);
      state.currentId = conv.id;
    }
    conv.messages.push({ role: 'user', content: text });
    generate(conv);
  }

  // ---- rendering --------------------------------------------------------------------------------------
  function renderList() {
    const items = state.conversations.map((c) => {
      const li = document.createElement('li');
      li.className = c.id === state.currentId ? 'active' : '';
      const open = document.createElement('button');
      open.type = 'button';
      open.className = 'open-conversation';
      open.textContent = c.title || 'Untitled';
      open.title = c.title || '';
      open.addEventListener('click', () => selectConversation(c.id));
      const del = document.createElement('button');
      del.type = 'button';
      del.className = 'delete-conversation icon';
      del.textContent = '×';
      del.setAttribute('aria-label', `Delete conversation: ${c.title}`);
      del.addEventListener('click', () => deleteConversation(c.id));
      li.append(open, del);
      return li;
    });
    el.list.replaceChildren(...items);
  }

  function renderAll() {
    renderList();
    const conv = current();
    const nodes = (conv ? conv.messages : []).map((m, i) => (m.role === 'user' ? userNode(m, i) : answerNode(m, i, conv)));
    el.empty.hidden = nodes.length > 0;
    el.messages.replaceChildren(el.empty, ...nodes);
    el.messages.scrollTop = el.messages.scrollHeight;
  }

  function button(label, cls, onClick) {
    const b = document.createElement('button');
    b.type = 'button';
    b.className = cls;
    b.textContent = label;
    b.addEventListener('click', onClick);
    return b;
  }

  function userNode(m, index) {
    const node = document.createElement('div');
    node.className = 'msg user';
    const bubble = document.createElement('div');
    bubble.className = 'bubble';
    bubble.textContent = m.content;
    const actions = document.createElement('div');
    actions.className = 'actions';
    actions.append(button('Edit', 'edit', () => startEdit(node, index)));
    node.append(bubble, actions);
    return node;
  }

  function answerNode(m, index, conv) {
    const node = document.createElement('div');
    node.className = 'msg assistant';
    const live = state.streaming?.message === m;
    if (m.reasoning) { // the fold appears with the first reasoning token (scheduleAnswerUpdate re-renders)
      const details = document.createElement('details');
      details.className = 'reasoning';
      details.open = live && !m.content; // open while it thinks, folded once the answer starts
      const summary = document.createElement('summary');
      const text = document.createElement('div');
      text.className = 'reasoning-text';
      text.textContent = m.reasoning;
      details.append(summary, text);
      node.append(details);
    }
    const answer = document.createElement('div');
    answer.className = 'answer markdown';
    node.append(answer);
    const meta = document.createElement('div');
    meta.className = 'meta';
    node.append(meta);
    fillAnswer(node, m, live);
    if (!live) {
      const actions = document.createElement('div');
      actions.className = 'actions';
      if (m.content) actions.append(button('Copy', 'copy-answer', (e) => copy(m.content, e.target)));
      if (index === conv.messages.length - 1) actions.append(button('Regenerate', 'regenerate', () => regenerate()));
      node.append(actions);
    }
    return node;
  }

  // The parts of an answer that change while it streams.
  function fillAnswer(node, m, live) {
    const summary = node.querySelector('.reasoning summary');
    if (summary) {
      summary.textContent = live && !m.content ? 'Thinking…' : 'Reasoning';
      node.querySelector('.reasoning-text').textContent = m.reasoning;
    }
    const answer = node.querySelector('.answer');
    answer.innerHTML = md.render(m.content);
    if (live) {
      const last = answer.lastElementChild;
      const host = last && last.tagName === 'P' ? last : answer; // the cursor ends the text, not a new line
      host.insertAdjacentHTML('beforeend', '<span class="cursor" aria-hidden="true"></span>');
    }
    if (m.error) {
      const err = document.createElement('div');
      err.className = 'error';
      err.setAttribute('role', 'alert');
      err.textContent = m.error;
      answer.append(err);
    }
    node.querySelector('.meta').textContent = metaText(m, live);
  }

  function metaText(m, live) {
    if (live) return m.content || m.reasoning ? 'generating…' : 'waiting for the model…';
    const parts = [];
    if (m.model) parts.push(m.model);
    if (m.stopped) parts.push('stopped');
    const s = m.stats;
    if (s) {
      parts.push(`${s.completionTokens} tokens`);
      if (s.tokensPerSecond !== null) parts.push(`${s.tokensPerSecond.toFixed(1)} tokens/s`);
      parts.push(`cache hit ${s.cacheHit}/${s.promptTokens} prompt tokens`);
      if (s.firstTokenSeconds !== null) parts.push(`first token ${s.firstTokenSeconds.toFixed(2)} s`);
    }
    return parts.join(' · ');
  }

  let pending = false;
  function scheduleAnswerUpdate() {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      const s = state.streaming;
      if (!s || s.conversation.id !== state.currentId) return;
      const node = el.messages.lastElementChild;
      if (s.message.content && node.querySelector('.reasoning')?.open && !node.dataset.userToggled) {
        node.querySelector('.reasoning').open = false; // the answer began: fold the reasoning
      }
      if (s.message.reasoning && !node.querySelector('.reasoning')) {
        renderAll(); // reasoning arrived on a conversation rendered without the fold
        return;
      }
      const nearBottom = el.messages.scrollHeight - el.messages.scrollTop - el.messages.clientHeight < 80;
      fillAnswer(node, s.message, true);
      if (nearBottom) el.messages.scrollTop = el.messages.scrollHeight;
    });
  }

  function setStreaming(on) {
    el.send.hidden = on;
    el.stop.hidden = !on;
    document.body.classList.toggle('streaming', on);
  }

  // ---- actions ----------------------------------------------------------------------------------------
  function regenerate() {
    const conv = current();
    if (!conv || state.streaming) return;
    if (conv.messages.at(-1)?.role === 'assistant') conv.messages.pop();
    if (conv.messages.at(-1)?.role === 'user') generate(conv);
  }

  function startEdit(node, index) {
    if (state.streaming) return;
    const conv = current();
    const box = document.createElement('textarea');
    box.className = 'edit-box';
    box.value = conv.messages[index].content;
    box.rows = Math.min(10, box.value.split('\n').length + 1);
    const actions = document.createElement('div');
    actions.className = 'actions';
    actions.append(
      button('Send', 'primary save-edit', () => {
        if (!box.value.trim()) return;
        conv.messages.splice(index); // everything from the edited message on is replaced
        conv.messages.push({ role: 'user', content: box.value });
        if (index === 0) conv.title = box.value.trim().slice(0, 60);
        generate(conv);
      }),
      button('Cancel', 'cancel-edit', () => renderAll()),
    );
    node.replaceChildren(box, actions);
    box.focus();
  }

  function selectConversation(id) {
    state.currentId = id; // a stream in progress goes on (and is saved) while another conversation is shown
    closeSidebar();
    renderAll();
  }

  function deleteConversation(id) {
    if (state.streaming?.conversation.id === id) state.streaming.controller.abort();
    state.conversations = state.conversations.filter((c) => c.id !== id);
    if (state.currentId === id) state.currentId = null;
    saveConversations();
    renderAll();
  }

  async function copy(text, target) {
    try {
      await navigator.clipboard.writeText(text);
    } catch {
      // no clipboard API (plain http on another host): the old way
      const area = document.createElement('textarea');
      area.value = text;
      document.body.append(area);
      area.select();
      document.execCommand('copy');
      area.remove();
    }
    const label = target.textContent;
    target.textContent = 'Copied';
    setTimeout(() => { target.textContent = label; }, 1200);
  }

  function showNotice(text) {
    el.notice.textContent = text;
    el.notice.hidden = false;
  }

  function hideNotice() {
    el.notice.hidden = true;
    el.apiKeyLabel.classList.remove('attention');
  }

  function openSettings(open) {
    el.settings.hidden = !open;
    el.settingsButton.setAttribute('aria-expanded', String(open));
  }

  function closeSidebar() {
    document.body.classList.remove('sidebar-open');
    el.scrim.hidden = true;
    el.toggle.setAttribute('aria-expanded', 'false');
  }

  // ---- wiring -----------------------------------------------------------------------------------------
  el.composer.addEventListener('submit', (e) => {
    e.preventDefault();
    const text = el.input.value;
    if (!text.trim() || state.streaming) return;
    el.input.value = '';
    autosize();
    send(text);
  });
  el.input.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      el.composer.requestSubmit();
    }
  });
  const autosize = () => {
    el.input.style.height = 'auto';
    el.input.style.height = `${Math.min(el.input.scrollHeight, 200)}px`;
  };
  el.input.addEventListener('input', autosize);
  el.stop.addEventListener('click', () => state.streaming?.controller.abort());
  el.newChat.addEventListener('click', () => {
    state.currentId = null;
    closeSidebar();
    renderAll();
    el.input.focus();
  });
  el.settingsButton.addEventListener('click', () => openSettings(el.settings.hidden));
  el.settings.addEventListener('submit', (e) => {
    e.preventDefault();
    const keyChanged = el.apiKey.value !== state.settings.apiKey;
    Object.assign(state.settings, { temperature: el.temperature.value, maxTokens: el.maxTokens.value,
      system: el.system.value, apiKey: el.apiKey.value });
    saveSettings();
    openSettings(false);
    if (keyChanged || !el.model.value) loadModels();
  });
  el.model.addEventListener('change', () => {
    state.settings.model = el.model.value;
    saveSettings();
  });
  el.toggle.addEventListener('click', () => {
    const open = !document.body.classList.contains('sidebar-open');
    document.body.classList.toggle('sidebar-open', open);
    el.scrim.hidden = !open;
    el.toggle.setAttribute('aria-expanded', String(open));
  });
  el.scrim.addEventListener('click', closeSidebar);
  el.messages.addEventListener('click', (e) => {
    const copyButton = e.target.closest('.copy-code');
    if (copyButton) copy(copyButton.closest('.code-block').querySelector('code').textContent, copyButton);
    const summary = e.target.closest('.reasoning summary');
    if (summary) summary.closest('.msg').dataset.userToggled = '1'; // the reader's choice: leave it as they set it
  });

  el.temperature.value = state.settings.temperature;
  el.maxTokens.value = state.settings.maxTokens;
  el.system.value = state.settings.system;
  el.apiKey.value = state.settings.apiKey;
  state.currentId = state.conversations[0]?.id ?? null;
  renderAll();
  loadModels();
})();
