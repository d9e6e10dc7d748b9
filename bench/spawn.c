/* The serial C spawner of bench/bench.py --real: the cheapest way to hand messages to a
 * sendmail-like program one at a time, as the baseline the relay must beat.
 *
 *   spawn MESSAGES PROGRAM [ARG...]
 *
 * MESSAGES holds the messages separated by NUL bytes. For each one: a pipe, posix_spawn
 * of PROGRAM with the pipe as its stdin, write the message, close, waitpid. Exits 1 with
 * one line on stderr if anything fails or the program exits non-zero, else 0.
 */
#define _GNU_SOURCE /* pipe2 */
#include <errno.h>
#include <fcntl.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

static int fail(const char *what, int err)
{
    fprintf(stderr, "spawn: %s: %s\n", what, strerror(err));
    return 1;
}

static int deliver(char **argv, const char *msg, size_t len)
{
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0)
        return fail("pipe", errno);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, fds[0], 0);
    pid_t pid;
    int err = posix_spawn(&pid, argv[0], &actions, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&actions);
    close(fds[0]);
    if (err != 0) {
        close(fds[1]);
        return fail(argv[0], err);
    }
    for (size_t done = 0; done < len;) {
        ssize_t n = write(fds[1], msg + done, len - done);
        if (n < 0 && errno != EINTR) {
            close(fds[1]);
            waitpid(pid, NULL, 0);
            return fail("write", errno);
        }
        done += n > 0 ? (size_t)n : 0;
    }
    close(fds[1]);
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            return fail("waitpid", errno);
    if (WIFSIGNALED(status)) {
        fprintf(stderr, "spawn: %s killed by signal %d\n", argv[0], WTERMSIG(status));
        return 1;
    }
    if (WEXITSTATUS(status) != 0) {
        fprintf(stderr, "spawn: %s exited %d\n", argv[0], WEXITSTATUS(status));
        return 1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: spawn MESSAGES PROGRAM [ARG...]\n");
        return 2;
    }
    int fd = open(argv[1], O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0)
        return fail(argv[1], errno);
    char *all = malloc((size_t)st.st_size + 1);
    size_t have = 0;
    while (all && have < (size_t)st.st_size) {
        ssize_t n = read(fd, all + have, (size_t)st.st_size - have);
        if (n <= 0)
            return fail(argv[1], n < 0 ? errno : EIO);
        have += (size_t)n;
    }
    if (!all)
        return fail("malloc", ENOMEM);
    close(fd);
    all[have] = '\0';
    for (char *msg = all; msg < all + have;) {
        size_t len = strlen(msg);
        if (deliver(argv + 2, msg, len) != 0)
            return 1;
        msg += len + 1;
    }
    return 0;
}
