package cuda

import (
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"testing"
)

// legacyAsync lists the driver calls that run on the legacy default stream
// and may return before their device work is done: cuMemcpyHtoD from
// pageable memory returns once the bytes are staged (the DMA still queued),
// cuMemset* and device-to-device copies are asynchronous to the host. The
// package's streams are non-blocking, so they do not wait for the legacy
// stream: work enqueued right after such a call may miss its effect (it did:
// uploads read back with their old contents on a shared GPU). The blocking
// cuMemcpyDtoH returns once complete and is not listed.
var legacyAsync = map[string]bool{
	"MemcpyHtoD": true, "MemcpyDtoD": true, "Memcpy": true, "MemcpyPeer": true,
	"MemsetD8": true, "MemsetD16": true, "MemsetD32": true,
	"MemsetD2D8": true, "MemsetD2D16": true, "MemsetD2D32": true,
}

// Every call of legacyAsync in the package's cuda build is followed, in the
// same function, by a synchronization of the legacy stream
// (cu.NoStream.Synchronize) or of the context (cu.Synchronize). A source
// check, so that it runs without a GPU.
func TestLegacyStreamCallsAreSynchronized(t *testing.T) {
	files, err := filepath.Glob("*_cuda.go")
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Skip("the package's sources are not here (test binary run elsewhere)")
	}
	fset := token.NewFileSet()
	calls := 0
	for _, name := range files {
		f, err := parser.ParseFile(fset, name, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		// the innermost function (declaration or literal) around each call
		var stack []ast.Node
		ast.Inspect(f, func(n ast.Node) bool {
			if n == nil {
				stack = stack[:len(stack)-1]
				return true
			}
			stack = append(stack, n)
			call, ok := n.(*ast.CallExpr)
			if !ok {
				return true
			}
			sel, ok := call.Fun.(*ast.SelectorExpr)
			if !ok || !isIdent(sel.X, "cu") || !legacyAsync[sel.Sel.Name] {
				return true
			}
			calls++
			var fn ast.Node
			for i := len(stack) - 1; i >= 0 && fn == nil; i-- {
				switch stack[i].(type) {
				case *ast.FuncLit, *ast.FuncDecl:
					fn = stack[i]
				}
			}
			if fn == nil || !syncsAfter(fn, call.End()) {
				t.Errorf("%s: cu.%s runs on the legacy default stream and may return before its work is done; synchronize the legacy stream (cu.NoStream.Synchronize) before returning, or use a stream of this package", fset.Position(call.Pos()), sel.Sel.Name)
			}
			return true
		})
	}
	if calls == 0 {
		t.Fatal("no legacy-stream call found: Device.CopyHtoD (cu.MemcpyHtoD) is expected to be one")
	}
}

func isIdent(e ast.Expr, name string) bool {
	id, ok := e.(*ast.Ident)
	return ok && id.Name == name
}

// syncsAfter reports whether fn calls cu.NoStream.Synchronize or
// cu.Synchronize after pos.
func syncsAfter(fn ast.Node, pos token.Pos) bool {
	found := false
	ast.Inspect(fn, func(n ast.Node) bool {
		call, ok := n.(*ast.CallExpr)
		if !ok || call.Pos() < pos {
			return !found
		}
		sel, ok := call.Fun.(*ast.SelectorExpr)
		if !ok || sel.Sel.Name != "Synchronize" {
			return !found
		}
		switch x := sel.X.(type) {
		case *ast.Ident: // cu.Synchronize()
			found = found || x.Name == "cu"
		case *ast.SelectorExpr: // cu.NoStream.Synchronize()
			found = found || (isIdent(x.X, "cu") && x.Sel.Name == "NoStream")
		}
		return !found
	})
	return found
}
