# Every git call of the published SDK 1.0.3, unpatched, in a machine whose
# template carries git (the host's git and its libraries, see
# `host_programs_layer`): clone, status, add, commit, log, branches,
# create/delete branch, checkout, push and pull, each checked by its
# effect on the repository, and a failing call as a GitError. The remote
# is a bare repository inside the guest (CI has no network).
import os
from nullspace import Machine
from nullspace.errors import GitError

m = Machine.create(template=os.environ["NS_TEMPLATE"])


def sh(cmd):
    r = m.commands.run(cmd, shell=True)
    assert r.exit_code == 0, (cmd, r.exit_code, r.stdout, r.stderr)
    return r.stdout


try:
    ident = "-c user.name=Seed -c user.email=seed@example.com"
    sh(
        "git init -q --bare /tmp/origin.git && git init -q -b main /tmp/seed && cd /tmp/seed"
        " && echo one > a.txt && git add a.txt && git %s commit -qm first"
        " && git remote add origin /tmp/origin.git && git push -q origin main 2>&1" % ident
    )

    m.git.clone("/tmp/origin.git", "/tmp/repo", branch="main")
    assert m.files.read("/tmp/repo/a.txt") == "one\n"
    st = m.git.status(path="/tmp/repo")
    assert st.branch == "main" and st.clean and st.changed_files == [], st

    m.files.write("/tmp/repo/b.txt", "two\n")
    m.files.write("/tmp/repo/a.txt", "one, changed\n")
    st = m.git.status(path="/tmp/repo")
    assert not st.clean and sorted(st.changed_files) == ["a.txt", "b.txt"], st
    m.git.add("/tmp/repo", files=["b.txt"])
    st = m.git.status(path="/tmp/repo")
    staged = {c.path: c.staged for c in st.changed}
    assert staged == {"a.txt": False, "b.txt": True}, st
    m.git.commit("second", ["b.txt"], path="/tmp/repo", author_name="Ada",
                 author_email="ada@example.com")
    log = m.git.log(path="/tmp/repo", limit=5)
    assert [c.message for c in log] == ["second", "first"], log
    assert (log[0].author_name, log[0].author_email) == ("Ada", "ada@example.com"), log[0]
    assert len(log[0].sha) == 40 and log[0].date, log[0]
    # Only b.txt was committed: a.txt is still modified, not staged.
    st = m.git.status(path="/tmp/repo")
    assert st.changed_files == ["a.txt"], st
    assert sh("cd /tmp/repo && git show --name-only --format= HEAD").split() == ["b.txt"]
    # Without files: everything (add_all), a.txt included.
    m.git.commit("third", path="/tmp/repo", author_name="Ada", author_email="ada@example.com")
    assert m.git.status(path="/tmp/repo").clean
    assert m.git.log(path="/tmp/repo", limit=1)[0].message == "third"

    m.git.create_branch("/tmp/repo", "feature")
    br = m.git.branches("/tmp/repo")
    assert br.current_branch == "main" and sorted(br.branches) == ["feature", "main"], br
    m.git.checkout("feature", path="/tmp/repo")
    assert m.git.branches("/tmp/repo").current_branch == "feature"
    m.git.checkout("topic", path="/tmp/repo", create=True)
    assert m.git.branches("/tmp/repo").current_branch == "topic"
    m.git.checkout("feature", path="/tmp/repo")
    m.git.delete_branch("/tmp/repo", "topic")
    assert sorted(m.git.branches("/tmp/repo").branches) == ["feature", "main"]

    m.git.push(path="/tmp/repo", branch="feature", set_upstream=True)
    assert sh("git --git-dir=/tmp/origin.git log --format=%s feature").split() == [
        "third", "second", "first"]

    m.git.checkout("main", path="/tmp/repo")
    m.git.push(path="/tmp/repo", branch="main")
    assert sh("git --git-dir=/tmp/origin.git log --format=%s -1 main").strip() == "third"

    # Someone else builds on main and pushes; pull brings it in.
    sh("cd /tmp/seed && git pull -q origin main && echo three > c.txt && git add c.txt"
       " && git %s commit -qm fourth && git push -q origin main 2>&1" % ident)
    m.git.pull(path="/tmp/repo", branch="main")
    assert m.files.read("/tmp/repo/c.txt") == "three\n"
    assert m.git.log(path="/tmp/repo", limit=1)[0].message == "fourth"

    # Failures are GitErrors naming what failed.
    try:
        m.git.checkout("no-such-branch", path="/tmp/repo")
        raise AssertionError("checkout of a missing branch succeeded")
    except GitError as e:
        assert "no-such-branch" in str(e), str(e)
    try:
        m.git.status(path="/tmp/not-a-repo")
        raise AssertionError("status outside a repository succeeded")
    except GitError as e:
        assert "/tmp/not-a-repo" in str(e) or "not a git repository" in str(e), str(e)
finally:
    m.kill()
print("GIT OK")
