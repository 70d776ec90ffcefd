package mesh

import "testing"

// TestMemberlistLayout fails when a memberlist upgrade changes the
// unexported node table that mlstate.go mirrors; without it Members cannot
// report suspect nodes and leaves are reported as failures.
func TestMemberlistLayout(t *testing.T) {
	if !checkMemberlistLayout() {
		t.Fatal("memberlist's nodeState/Memberlist layout no longer matches nodeStateMirror: update mlstate.go for the new memberlist version")
	}
}
