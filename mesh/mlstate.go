package mesh

import (
	"reflect"
	"sync"
	"time"
	"unsafe"

	"github.com/hashicorp/memberlist"
)

// memberlist v0.7.0 keeps each peer's real state (alive, suspect, dead,
// left) in an unexported nodeState that embeds the exported Node; the
// Node.State field it hands out is never set, so Members() shows suspect
// nodes as alive and NotifyLeave cannot tell a leave from a failure. This
// file reads the unexported state through a mirror struct whose layout is
// checked against memberlist's by reflection once; if a future memberlist
// changes the layout, the check fails, the accessor reports itself
// unavailable (mlStateOK false), the Mesh falls back to event-derived
// states without "suspect" and TestMemberlistLayout fails loudly.

// nodeStateMirror must match memberlist's nodeState field for field.
type nodeStateMirror struct {
	memberlist.Node
	Incarnation uint32
	State       memberlist.NodeStateType
	StateChange time.Time
}

var (
	mlLayoutOnce sync.Once
	mlStateOK    bool
	mlLockOff    uintptr // offset of Memberlist.nodeLock
	mlNodesOff   uintptr // offset of Memberlist.nodes
)

func checkMemberlistLayout() bool {
	mlLayoutOnce.Do(func() {
		mt := reflect.TypeOf(memberlist.Memberlist{})
		lock, ok1 := mt.FieldByName("nodeLock")
		nodes, ok2 := mt.FieldByName("nodes")
		if !ok1 || !ok2 || lock.Type != reflect.TypeOf(sync.RWMutex{}) ||
			nodes.Type.Kind() != reflect.Slice || nodes.Type.Elem().Kind() != reflect.Pointer {
			return
		}
		st := nodes.Type.Elem().Elem()
		mirror := reflect.TypeOf(nodeStateMirror{})
		if st.Kind() != reflect.Struct || st.NumField() != mirror.NumField() || st.Size() != mirror.Size() {
			return
		}
		for i := 0; i < st.NumField(); i++ {
			a, b := st.Field(i), mirror.Field(i)
			if a.Name != b.Name || a.Type != b.Type || a.Offset != b.Offset {
				return
			}
		}
		mlLockOff, mlNodesOff = lock.Offset, nodes.Offset
		mlStateOK = true
	})
	return mlStateOK
}

// mlNodeInfo is a copy of one entry of memberlist's node table.
type mlNodeInfo struct {
	State       memberlist.NodeStateType
	StateChange time.Time
}

// mlSnapshot copies name → state of every node memberlist tracks (alive,
// suspect, and dead or left until memberlist reaps them), under
// memberlist's node lock. It must not be called from an event callback
// (memberlist holds the lock there). ok is false when the layout check
// failed.
func mlSnapshot(ml *memberlist.Memberlist) (map[string]mlNodeInfo, bool) {
	if !checkMemberlistLayout() {
		return nil, false
	}
	base := unsafe.Pointer(ml)
	lock := (*sync.RWMutex)(unsafe.Add(base, mlLockOff))
	lock.RLock()
	defer lock.RUnlock()
	nodes := *(*[]*nodeStateMirror)(unsafe.Add(base, mlNodesOff))
	out := make(map[string]mlNodeInfo, len(nodes))
	for _, n := range nodes {
		if n == nil {
			continue
		}
		out[n.Name] = mlNodeInfo{State: n.State, StateChange: n.StateChange}
	}
	return out, true
}

// mlStateInCallback returns the state of the node whose *Node memberlist
// passed to an EventDelegate method. Only valid inside that callback,
// where memberlist holds its node lock and n points into a nodeState.
func mlStateInCallback(n *memberlist.Node) (memberlist.NodeStateType, bool) {
	if !checkMemberlistLayout() {
		return 0, false
	}
	return (*nodeStateMirror)(unsafe.Pointer(n)).State, true
}

// mlIncarnation returns the incarnation memberlist holds for the named
// node (for this node: bumped by every refutation and metadata update).
func mlIncarnation(ml *memberlist.Memberlist, name string) (uint32, bool) {
	if !checkMemberlistLayout() {
		return 0, false
	}
	base := unsafe.Pointer(ml)
	lock := (*sync.RWMutex)(unsafe.Add(base, mlLockOff))
	lock.RLock()
	defer lock.RUnlock()
	for _, n := range *(*[]*nodeStateMirror)(unsafe.Add(base, mlNodesOff)) {
		if n != nil && n.Name == name {
			return n.Incarnation, true
		}
	}
	return 0, false
}
