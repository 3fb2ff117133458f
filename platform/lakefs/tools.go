//go:build tools

// Package tools pins the lakeFS server so `go mod tidy` keeps its dependencies.
package tools

import _ "github.com/treeverse/lakefs/cmd/lakefs"
