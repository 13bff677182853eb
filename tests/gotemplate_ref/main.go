// Reference executor for differential tests of ollama_ft/ollamafmt/gotemplate.py:
// reads a JSON array of {"template": "...", "data": {...}} from stdin and prints a JSON
// array of {"out": "..."} or {"error": "..."}, executing each with Go's text/template,
// missingkey=zero and the functions Ollama's templates have.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"text/template"
	"time"
)

type job struct {
	Template string         `json:"template"`
	Data     map[string]any `json:"data"`
}

type result struct {
	Out   *string `json:"out,omitempty"`
	Error string  `json:"error,omitempty"`
}

var funcs = template.FuncMap{
	// as Ollama's template package: json.Marshal (which escapes <, > and &)
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
	"currentDate":   func() string { return time.Now().Format("2006-01-02") },
	"yesterdayDate": func() string { return time.Now().AddDate(0, 0, -1).Format("2006-01-02") },
	"toTypeScriptType": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
}

func run(j job) (res result) {
	defer func() {
		if r := recover(); r != nil {
			res = result{Error: fmt.Sprint(r)}
		}
	}()
	t, err := template.New("t").Option("missingkey=zero").Funcs(funcs).Parse(j.Template)
	if err != nil {
		return result{Error: err.Error()}
	}
	var b bytes.Buffer
	if err := t.Execute(&b, j.Data); err != nil {
		return result{Error: err.Error()}
	}
	s := b.String()
	return result{Out: &s}
}

func main() {
	var jobs []job
	dec := json.NewDecoder(os.Stdin)
	if err := dec.Decode(&jobs); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	out := make([]result, len(jobs))
	for i, j := range jobs {
		out[i] = run(j)
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(out)
}
