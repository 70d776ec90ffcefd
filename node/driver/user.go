package driver

import (
	"fmt"
	"os"
	"os/user"
	"strconv"
	"syscall"
)

// TaskUser is the account a task runs as: the supervisor keeps the
// daemon's user and starts the command with these credentials (which needs
// root unless they are the daemon's own).
type TaskUser struct {
	// Name is the user's login name, for messages and $USER.
	Name string `json:"name"`
	// UID and GID are the user's IDs; Groups its supplementary groups.
	UID    uint32   `json:"uid"`
	GID    uint32   `json:"gid"`
	Groups []uint32 `json:"groups,omitempty"`
	// Home is the user's home directory from the password database.
	Home string `json:"home,omitempty"`
}

// LookupUser resolves a user name (or numeric UID) from the system's user
// database.
func LookupUser(name string) (*TaskUser, error) {
	u, err := user.Lookup(name)
	if err != nil {
		if _, nerr := strconv.Atoi(name); nerr == nil {
			u, err = user.LookupId(name)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("%w: user %q: %v (create it, e.g. useradd --system --no-create-home %s, or name another)", ErrInvalidSpec, name, err, name)
	}
	uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
	gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
	if err1 != nil || err2 != nil {
		return nil, fmt.Errorf("%w: user %q has non-numeric IDs %s:%s", ErrInvalidSpec, name, u.Uid, u.Gid)
	}
	tu := &TaskUser{Name: u.Username, UID: uint32(uid), GID: uint32(gid), Home: u.HomeDir}
	if gids, err := u.GroupIds(); err == nil {
		for _, g := range gids {
			if n, err := strconv.ParseUint(g, 10, 32); err == nil && uint32(n) != tu.GID {
				tu.Groups = append(tu.Groups, uint32(n))
			}
		}
	}
	return tu, nil
}

// CurrentUser is the daemon's own user: tasks of a daemon that is not root
// run as it.
func CurrentUser() (*TaskUser, error) {
	return LookupUser(strconv.Itoa(os.Geteuid()))
}

// checkUser refuses a user this process cannot switch to.
func checkUser(u *TaskUser) error {
	if u == nil {
		return nil
	}
	if euid := os.Geteuid(); euid != 0 && u.UID != uint32(euid) {
		return fmt.Errorf("%w: running a task as %s (uid %d) needs the agent to run as root; it runs as uid %d", ErrInvalidSpec, u.Name, u.UID, euid)
	}
	return nil
}

// prepareUserDirs lets the task's user work in its directories: the
// allocation directory becomes group-owned by the user's group, mode 1770
// (the sticky bit keeps the driver's own files there, such as the state
// directory and the deadline file, out of the task's reach), and a working
// directory elsewhere becomes the user's.
func prepareUserDirs(u *TaskUser, allocDir, workDir string) error {
	if u == nil || os.Geteuid() != 0 {
		return nil
	}
	if err := os.Chown(allocDir, 0, int(u.GID)); err != nil {
		return err
	}
	if err := os.Chmod(allocDir, 0o770|os.ModeSticky); err != nil {
		return err
	}
	if workDir != allocDir {
		return os.Chown(workDir, int(u.UID), int(u.GID))
	}
	return nil
}

// credential is what the kernel sets before exec; nil keeps ours. With an
// empty Groups list the task has no supplementary groups (none of the
// daemon's).
func credential(u *TaskUser) *syscall.Credential {
	if u == nil {
		return nil
	}
	return &syscall.Credential{Uid: u.UID, Gid: u.GID, Groups: append([]uint32{}, u.Groups...)}
}
