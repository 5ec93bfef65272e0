//go:build tools

// Package tools only pins k8s.io/kubernetes/cmd/kube-apiserver so that `go mod tidy`
// keeps every module it needs; it is never compiled.
package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
