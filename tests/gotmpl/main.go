// Command gotmpl executes an Ollama TEMPLATE with Go's real text/template, set up the way
// the Ollama server sets it up, so tests can compare what Ollama would feed the model with
// what the Hugging Face chat template renders.
//
// It follows these Ollama facts (template/template.go, server/prompt.go, server/routes.go,
// thinking/template.go in github.com/ollama/ollama; no code copied):
//   - parse with Option("missingkey=zero") and the functions json, currentDate,
//     yesterdayDate, toTypeScriptType (the last one simplified here);
//   - if the template names neither .Messages nor .Response, {{ .Response }} is appended;
//   - system messages are joined with "\n\n" into .System (they stay in .Messages too);
//     consecutive messages of the same role, except "tool", are merged with "\n\n";
//   - a template that names .Messages is executed once with a map holding System,
//     Messages, Tools, Response (""), Think, ThinkLevel, IsThinkSet; otherwise it runs in
//     the legacy way, once per turn with .System/.Prompt/.Response, the last turn cut
//     just before .Response;
//   - think: Think is true for true or a level string, ThinkLevel is the level ("medium"
//     for true), IsThinkSet is whether think was given at all;
//   - with "handler": "chat", /api/chat's rule: a model with the thinking capability gets
//     think=true when the request leaves it unset; one without refuses think=true;
//   - the thinking capability: a .Thinking field inside a range over .Messages whose
//     nearest enclosing list starts and ends with text (the trimmed texts are the tags).
//
// Input (stdin, JSON):
//
//	{"template": "...", "cases": [{"messages": [{"role", "content", "thinking",
//	  "tool_calls", "tool_name", "tool_call_id"}], "tools": [...], "think": null|bool|"high",
//	  "handler": ""|"chat"}]}
//
// Output (stdout, JSON): {"vars": [...], "capabilities": [...], "thinking_tags": [open,
// close], "results": [{"prompt": "..."} or {"error": "..."}]}, or {"error": "..."} when the
// template does not parse. Exit status 2 for unreadable input.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"text/template"
	"text/template/parse"
	"time"
)

// ---- the data model Ollama hands to templates ------------------------------------------

type ToolCallFunction struct {
	Index     int     `json:"index"`
	Name      string  `json:"name"`
	Arguments JSONMap `json:"arguments"`
}

type ToolCall struct {
	ID       string           `json:"id"`
	Function ToolCallFunction `json:"function"`
}

// JSONMap prints as JSON inside a template, as Ollama's argument maps do.
type JSONMap map[string]any

func (m JSONMap) String() string {
	if m == nil {
		return "{}"
	}
	b, _ := json.Marshal(map[string]any(m))
	return string(b)
}

// Tool is kept as decoded JSON; it prints as JSON.
type Tool map[string]any

func (t Tool) String() string {
	b, _ := json.Marshal(map[string]any(t))
	return string(b)
}

type Tools []Tool

func (t Tools) String() string {
	b, _ := json.Marshal([]Tool(t))
	return string(b)
}

type Message struct {
	Role       string     `json:"role"`
	Content    string     `json:"content"`
	Thinking   string     `json:"thinking"`
	Images     []string   `json:"images"`
	ToolCalls  []ToolCall `json:"tool_calls"`
	ToolName   string     `json:"tool_name"`
	ToolCallID string     `json:"tool_call_id"`
}

type Case struct {
	Messages []Message `json:"messages"`
	Tools    Tools     `json:"tools"`
	Think    any       `json:"think"`
	Handler  string    `json:"handler"`
}

type Request struct {
	Template string `json:"template"`
	Cases    []Case `json:"cases"`
}

type Result struct {
	Prompt *string `json:"prompt,omitempty"`
	Error  string  `json:"error,omitempty"`
}

type Response struct {
	Error        string    `json:"error,omitempty"`
	Vars         []string  `json:"vars"`
	Capabilities []string  `json:"capabilities"`
	ThinkingTags [2]string `json:"thinking_tags"`
	Results      []Result  `json:"results"`
}

var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
	"currentDate": func(args ...string) string {
		return time.Now().Format("2006-01-02")
	},
	"yesterdayDate": func(args ...string) string {
		return time.Now().AddDate(0, 0, -1).Format("2006-01-02")
	},
	"toTypeScriptType": func(v any) string { return "any" },
}

// ---- parsing ------------------------------------------------------------------------------

func parseTemplate(text string) (*template.Template, []string, error) {
	t, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(text)
	if err != nil {
		return nil, nil, err
	}
	vars := identifiers(t)
	if !contains(vars, "messages") && !contains(vars, "response") {
		respField := &parse.FieldNode{NodeType: parse.NodeField, Ident: []string{"Response"}}
		cmd := &parse.CommandNode{NodeType: parse.NodeCommand, Args: []parse.Node{respField}}
		pipe := &parse.PipeNode{NodeType: parse.NodePipe, Cmds: []*parse.CommandNode{cmd}}
		t.Tree.Root.Nodes = append(t.Tree.Root.Nodes, &parse.ActionNode{NodeType: parse.NodeAction, Pipe: pipe})
	}
	return t, vars, nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// identifiers: every field and variable name in every template, lower-cased, sorted, unique.
func identifiers(t *template.Template) []string {
	seen := map[string]bool{}
	var visit func(n parse.Node)
	visit = func(n parse.Node) {
		switch x := n.(type) {
		case *parse.ListNode:
			if x == nil {
				return
			}
			for _, c := range x.Nodes {
				visit(c)
			}
		case *parse.ActionNode:
			visit(x.Pipe)
		case *parse.TemplateNode:
			if x.Pipe != nil {
				visit(x.Pipe)
			}
		case *parse.IfNode:
			visitBranch(&x.BranchNode, visit)
		case *parse.RangeNode:
			visitBranch(&x.BranchNode, visit)
		case *parse.WithNode:
			visitBranch(&x.BranchNode, visit)
		case *parse.PipeNode:
			if x == nil {
				return
			}
			for _, c := range x.Cmds {
				for _, a := range c.Args {
					visit(a)
				}
			}
		case *parse.FieldNode:
			for _, id := range x.Ident {
				seen[strings.ToLower(id)] = true
			}
		case *parse.VariableNode:
			for _, id := range x.Ident {
				seen[strings.ToLower(id)] = true
			}
		}
	}
	for _, tt := range t.Templates() {
		if tt.Tree != nil {
			visit(tt.Tree.Root)
		}
	}
	out := make([]string, 0, len(seen))
	for k := range seen {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func visitBranch(b *parse.BranchNode, visit func(parse.Node)) {
	visit(b.Pipe)
	visit(b.List)
	if b.ElseList != nil {
		visit(b.ElseList)
	}
}

// thinkingTags: Ollama's heuristic for the tags around reasoning (see the header).
func thinkingTags(t *template.Template) (string, string) {
	open, close := "", ""
	var path []parse.Node
	var visit func(n parse.Node)
	visit = func(n parse.Node) {
		if n == nil {
			return
		}
		if l, ok := n.(*parse.ListNode); ok && l == nil {
			return
		}
		path = append(path, n)
		defer func() { path = path[:len(path)-1] }()
		switch x := n.(type) {
		case *parse.FieldNode:
			if len(x.Ident) > 0 && x.Ident[0] == "Thinking" && insideMessagesRange(path) {
				for i := len(path) - 1; i >= 0; i-- {
					if l, ok := path[i].(*parse.ListNode); ok {
						if tx, ok := l.Nodes[0].(*parse.TextNode); ok {
							open = strings.TrimSpace(string(tx.Text))
						}
						if tx, ok := l.Nodes[len(l.Nodes)-1].(*parse.TextNode); ok {
							close = strings.TrimSpace(string(tx.Text))
						}
						break
					}
				}
			}
		case *parse.ListNode:
			for _, c := range x.Nodes {
				visit(c)
			}
		case *parse.ActionNode:
			visit(x.Pipe)
		case *parse.TemplateNode:
			if x.Pipe != nil {
				visit(x.Pipe)
			}
		case *parse.IfNode:
			visit(&x.BranchNode)
		case *parse.RangeNode:
			visit(&x.BranchNode)
		case *parse.WithNode:
			visit(&x.BranchNode)
		case *parse.BranchNode:
			if x.Pipe != nil {
				visit(x.Pipe)
			}
			if x.List != nil {
				visit(x.List)
			}
			if x.ElseList != nil {
				visit(x.ElseList)
			}
		case *parse.PipeNode:
			for _, c := range x.Cmds {
				visit(c)
			}
		case *parse.CommandNode:
			for _, a := range x.Args {
				visit(a)
			}
		}
	}
	visit(t.Tree.Root)
	return open, close
}

// insideMessagesRange: the nearest enclosing range iterates over something naming .Messages.
func insideMessagesRange(path []parse.Node) bool {
	for i := len(path) - 1; i >= 0; i-- {
		if r, ok := path[i].(*parse.RangeNode); ok {
			return pipeNamesField(r.Pipe, "Messages")
		}
	}
	return false
}

func pipeNamesField(p *parse.PipeNode, name string) bool {
	if p == nil {
		return false
	}
	for _, c := range p.Cmds {
		for _, a := range c.Args {
			switch x := a.(type) {
			case *parse.FieldNode:
				if len(x.Ident) > 0 && x.Ident[0] == name {
					return true
				}
			case *parse.PipeNode:
				if pipeNamesField(x, name) {
					return true
				}
			}
		}
	}
	return false
}

// ---- executing ----------------------------------------------------------------------------

// collate: all system contents joined for .System; consecutive same-role messages merged.
func collate(msgs []Message) (string, []*Message) {
	var system []string
	var out []*Message
	for i := range msgs {
		m := msgs[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if n := len(out); n > 0 && out[n-1].Role == m.Role && m.Role != "tool" {
			out[n-1].Content += "\n\n" + m.Content
		} else {
			out = append(out, &m)
		}
	}
	return strings.Join(system, "\n\n"), out
}

type thinkValue struct {
	set   bool
	on    bool
	level string
}

func readThink(v any) (thinkValue, error) {
	switch x := v.(type) {
	case nil:
		return thinkValue{}, nil
	case bool:
		level := ""
		if x {
			level = "medium"
		}
		return thinkValue{set: true, on: x, level: level}, nil
	case string:
		switch x {
		case "high", "medium", "low", "max":
			return thinkValue{set: true, on: true, level: x}, nil
		}
	}
	return thinkValue{}, fmt.Errorf("invalid think value %v", v)
}

func execute(t *template.Template, vars []string, c Case, thinkingCapable bool) (string, error) {
	think, err := readThink(c.Think)
	if err != nil {
		return "", err
	}
	if c.Handler == "chat" {
		if thinkingCapable && !think.set {
			think = thinkValue{set: true, on: true, level: "medium"}
		} else if !thinkingCapable && think.on {
			return "", errors.New("model does not support thinking")
		}
	}
	system, msgs := collate(c.Messages)
	var b bytes.Buffer
	if contains(vars, "messages") {
		err := t.Execute(&b, map[string]any{
			"System":     system,
			"Messages":   msgs,
			"Tools":      c.Tools,
			"Response":   "",
			"Think":      think.on,
			"ThinkLevel": think.level,
			"IsThinkSet": think.set,
		})
		return b.String(), err
	}
	return executeLegacy(t, msgs, think)
}

func executeLegacy(t *template.Template, msgs []*Message, think thinkValue) (string, error) {
	var b bytes.Buffer
	system, prompt, response := "", "", ""
	data := func() map[string]any {
		return map[string]any{"System": system, "Prompt": prompt, "Response": response,
			"Think": think.on, "ThinkLevel": think.level, "IsThinkSet": think.set}
	}
	flush := func() error {
		if err := t.Execute(&b, data()); err != nil {
			return err
		}
		system, prompt, response = "", "", ""
		return nil
	}
	for _, m := range msgs {
		switch m.Role {
		case "system":
			if prompt != "" || response != "" {
				if err := flush(); err != nil {
					return "", err
				}
			}
			system = m.Content
		case "user":
			if response != "" {
				if err := flush(); err != nil {
					return "", err
				}
			}
			prompt = m.Content
		case "assistant":
			response = m.Content
		}
	}
	root := t.Tree.Root.CopyList()
	cut := false
	cutAtResponse(root, &cut)
	last, err := template.New("").Option("missingkey=zero").Funcs(funcs).AddParseTree("", &parse.Tree{Root: root})
	if err != nil {
		return "", err
	}
	if err := last.Execute(&b, data()); err != nil {
		return "", err
	}
	return b.String(), nil
}

// cutAtResponse drops the first .Response field and everything after it in document order,
// so the last turn ends where the model's answer begins.
func cutAtResponse(l *parse.ListNode, cut *bool) {
	if l == nil {
		return
	}
	var kept []parse.Node
	for _, n := range l.Nodes {
		if *cut {
			continue
		}
		switch x := n.(type) {
		case *parse.ActionNode:
			if cutPipe(x.Pipe, cut) {
				kept = append(kept, x)
			}
			continue
		case *parse.IfNode:
			cutBranch(&x.BranchNode, cut)
		case *parse.RangeNode:
			cutBranch(&x.BranchNode, cut)
		case *parse.WithNode:
			cutBranch(&x.BranchNode, cut)
		}
		kept = append(kept, n)
	}
	l.Nodes = kept
}

func cutBranch(b *parse.BranchNode, cut *bool) {
	cutAtResponse(b.List, cut)
	if b.ElseList != nil {
		cutAtResponse(b.ElseList, cut)
	}
}

// cutPipe removes the .Response argument and what follows it; false when nothing is left.
func cutPipe(p *parse.PipeNode, cut *bool) bool {
	var cmds []*parse.CommandNode
	for _, c := range p.Cmds {
		var args []parse.Node
		for _, a := range c.Args {
			if f, ok := a.(*parse.FieldNode); ok && contains(f.Ident, "Response") {
				*cut = true
			}
			if !*cut {
				args = append(args, a)
			}
		}
		if len(args) > 0 {
			c.Args = args
			cmds = append(cmds, c)
		}
	}
	p.Cmds = cmds
	return len(cmds) > 0
}

func main() {
	raw, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	var req Request
	if err := json.Unmarshal(raw, &req); err != nil {
		fmt.Fprintln(os.Stderr, "bad request:", err)
		os.Exit(2)
	}
	var resp Response
	t, vars, err := parseTemplate(req.Template)
	if err != nil {
		resp.Error = err.Error()
	} else {
		resp.Vars = vars
		open, close := thinkingTags(t)
		resp.ThinkingTags = [2]string{open, close}
		capable := open != "" && close != ""
		resp.Capabilities = []string{"completion"}
		if contains(vars, "tools") {
			resp.Capabilities = append(resp.Capabilities, "tools")
		}
		if capable {
			resp.Capabilities = append(resp.Capabilities, "thinking")
		}
		for _, c := range req.Cases {
			prompt, err := execute(t, vars, c, capable)
			if err != nil {
				resp.Results = append(resp.Results, Result{Error: err.Error()})
			} else {
				p := prompt
				resp.Results = append(resp.Results, Result{Prompt: &p})
			}
		}
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(resp); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
}
