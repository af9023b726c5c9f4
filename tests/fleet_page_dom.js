// Runs the fleet page's own script (fleet_page.html) under Node with the few DOM calls it
// makes, renders one /api/status document with its render(), and prints what each limit's
// card shows: a test reads the page as a person would, without a browser.
// Usage: node fleet_page_dom.js <page.html> <status.json>
"use strict";
const fs = require("fs");
const vm = require("vm");

class Node {
  constructor(tag, text) {
    this.tag = tag; this.children = []; this.attrs = {}; this.className = "";
    this.style = {}; this.own = text === undefined ? "" : String(text);
    const self = this;
    this.classList = {
      add(c) { if (!self.className.split(" ").includes(c)) self.className = (self.className + " " + c).trim(); },
      toggle(c, on) { const cs = self.className.split(" ").filter(x => x && x !== c);
        if (on) cs.push(c); self.className = cs.join(" "); },
    };
  }
  get textContent() { return this.own + this.children.map(c => c.textContent).join(""); }
  set textContent(v) { this.own = String(v); this.children = []; }
  get firstChild() { return this.children[0]; }
  get lastChild() { return this.children[this.children.length - 1]; }
  append(...nodes) { for (const n of nodes) this.children.push(typeof n === "string" ? new Node("#text", n) : n); }
  replaceChildren(...nodes) { this.children = []; this.append(...nodes); }
  setAttribute(k, v) { this.attrs[k] = String(v); }
  getAttribute(k) { return this.attrs[k]; }
}

const [html, json] = process.argv.slice(2).map(p => fs.readFileSync(p, "utf8"));
const script = html.match(/<script>([\s\S]*)<\/script>/)[1];
const byId = { conn: new Node("span"), limits: new Node("main"), span: new Node("span") };
const document = {
  createElement: tag => new Node(tag),
  createElementNS: (_ns, tag) => new Node(tag),
  createTextNode: text => new Node("#text", text),
  getElementById: id => byId[id],
};
const context = vm.createContext({
  document, URL, location: { href: "http://127.0.0.1/" }, console, Math, Object, JSON,
  fetch: () => new Promise(() => {}), setTimeout: () => 0, Date, String, Number, Set,
});
vm.runInContext(script, context);
context.render(JSON.parse(json));

const rows = node => node.children.filter(n => n.className.split(" ").includes("row"));
const out = byId.limits.children.map(section => ({
  limit: section.attrs["data-limit"],
  rows: rows(section).map(r => ({
    k: r.children[0].textContent, v: r.children[1].textContent,
    cls: r.className, attrs: r.attrs,
    items: r.children[1].children.filter(n => n.className === "key").map(n => n.textContent),
  })),
  sparks: section.children.filter(n => n.className === "spark")
    .map(n => [n.children[0].textContent, n.children[1].children.length]),
}));
process.stdout.write(JSON.stringify({ conn: byId.conn.textContent, limits: out }));
