package collective

import "sync/atomic"

type atomicBool = atomic.Bool
